"""Prometheus exposition of the controller's state (adapter layer), rendered at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from controller.engine import Engine

PREFIX = "gpu_controller"


class ControllerCollector(Collector):
    """Reads the engine's ledger, agent links and schedulers on every scrape."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        """Per-agent memory and health gauges, then job, request and decision counts."""
        engine = self._engine
        states = engine.states(engine.clock())

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels or [])

        healthy = gauge("agent_healthy", "1 when the agent may take new work", ["agent"])
        budget = gauge("agent_budget_bytes", "GPU memory the controller may use", ["agent"])
        used = gauge("agent_used_bytes", "GPU memory in use (NVML)", ["agent"])
        pending = gauge(
            "agent_promised_bytes", "Memory promised to work not yet visible", ["agent"]
        )
        free = gauge("agent_free_bytes", "Budget left in the ledger", ["agent"])
        age = gauge("agent_age_seconds", "Seconds since the agent's last message", ["agent"])
        draining = gauge(
            "agent_draining", "1 while a starving image job blocks new loads", ["agent"]
        )
        ollama_up = gauge("agent_ollama_up", "1 when the agent's Ollama answers", ["agent"])
        comfyui_up = gauge("agent_comfyui_up", "1 when the agent's ComfyUI answers", ["agent"])
        for state in states:
            link = engine.links[state.name]
            healthy.add_metric([state.name], 1.0 if state.healthy else 0.0)
            budget.add_metric([state.name], state.budget_bytes)
            used.add_metric([state.name], state.used_bytes)
            pending.add_metric([state.name], state.pending_bytes)
            free.add_metric([state.name], state.free_bytes)
            seconds = link.age_s()
            age.add_metric([state.name], seconds if seconds is not None else float("nan"))
            draining.add_metric([state.name], 1.0 if state.held_image_since is not None else 0.0)
            status = link.status
            if status is not None:
                ollama_up.add_metric([state.name], 1.0 if status.ollama.reachable else 0.0)
                comfyui_up.add_metric([state.name], 1.0 if status.comfyui.reachable else 0.0)
        yield from (healthy, budget, used, pending, free, age, draining, ollama_up, comfyui_up)

        jobs = gauge("image_jobs", "Image jobs by state", ["state"])
        for state_name, count in engine.images.counts().items():
            jobs.add_metric([state_name], count)
        yield jobs
        inflight = gauge("llm_requests_in_flight", "LLM requests being served")
        inflight.add_metric([], engine.llm.in_flight)
        yield inflight
        decisions = gauge("policy_decisions", "Decisions taken by the policy core since start")
        decisions.add_metric([], engine.decisions)
        yield decisions


def make_registry(engine: Engine) -> CollectorRegistry:
    """A registry holding only the controller's collector (no process-global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(engine))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, and the Content-Type to serve it with."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
