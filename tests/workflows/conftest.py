"""Fixtures of the workflow tests: one Redis server and one simulated stack for the session,
the Celery app pointed at them, and a worker process per module that asks for one.

Without `redis-server` the tests that need it skip and say so (`make redis` installs it); in
CI (`CI` set) its absence fails them instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.workflows import WorkflowApp, app
from tests.workflows.harness import RedisServer, StackThread, WorkerProcess, redis_server_path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if redis_server_path() is None:
        message = "redis-server is not installed; `make redis` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackThread]:
    stack = StackThread(Path(tmp_path_factory.mktemp("stack")))
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def workflow_app(redis_server: RedisServer, sim_stack: StackThread) -> WorkflowApp:
    """The package's Celery app, on the session's Redis and controller."""
    app.apply_settings(redis_server.settings(sim_stack.url))
    return app


@pytest.fixture(scope="module")
def worker(
    workflow_app: WorkflowApp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """`celery -A controller.workflows worker --concurrency 2`, as the Mac mini runs it."""
    process = WorkerProcess(
        workflow_app.workflow_settings, "module", log=tmp_path_factory.mktemp("worker") / "log"
    )
    try:
        process.wait_ready(lambda name: bool(workflow_app.control.ping([name], timeout=0.5)))
        yield process
    finally:
        process.stop()
