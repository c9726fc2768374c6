"""The studio's Celery application (composition: settings, agents and the run records).

`app` is configured from `WorkflowSettings` (the `GPU_WORKFLOWS_*` environment) when first
imported; `celery -A controller.workflows worker --concurrency 2` finds it. It is the one
module-level object of the package, as Celery's command line requires, and it owns the rest:
the node agents (`app.agents`, the built-in ones plus those of `agent_modules`) and the Redis
client of the run records, made once per worker process (prefork children make their own).
"""

from __future__ import annotations

import importlib
import os
import threading

from celery import Celery

from controller.workflows.agents import AgentRegistry
from controller.workflows.runs import RunStore, redis_client
from controller.workflows.settings import WorkflowSettings


class WorkflowApp(Celery):  # type: ignore[misc]
    """A Celery app that knows the controller, the node agents and the run records."""

    def __init__(self, settings: WorkflowSettings | None = None) -> None:
        super().__init__("controller.workflows")
        self.agents = AgentRegistry()
        self._lock = threading.Lock()
        self._runs: tuple[int, RunStore] | None = None
        self._modules_loaded: tuple[str, ...] = ()
        self.workflow_settings = settings or WorkflowSettings()
        self.conf.update(self.workflow_settings.celery_config())

    def apply_settings(self, settings: WorkflowSettings) -> None:
        """Use `settings` from now on (tests point the app at their own Redis and controller).

        Call it before the app first talks to its broker: Celery keeps the connections it made."""
        with self._lock:
            self.workflow_settings = settings
            self.conf.update(settings.celery_config())
            if self._runs is not None:
                self._runs[1].close()
            self._runs = None

    def runs(self) -> RunStore:
        """The run records, with a Redis client made in this process."""
        with self._lock:
            if self._runs is None or self._runs[0] != os.getpid():
                settings = self.workflow_settings
                client = redis_client(settings.result_backend, timeout_s=settings.request_timeout_s)
                self._runs = (os.getpid(), RunStore(client, ttl_s=settings.result_expires_s))
            return self._runs[1]

    def load_agent_modules(self) -> None:
        """Import the modules that register the studio's agents (once per list of names)."""
        modules = tuple(self.workflow_settings.agent_modules)
        if modules != self._modules_loaded:
            for name in modules:
                importlib.import_module(name)
            self._modules_loaded = modules


app = WorkflowApp()
