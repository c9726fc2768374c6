"""Prometheus exposition of the agent's state (adapter layer).

A custom collector renders the latest status at scrape time, so metrics never disagree with
`/v1/status` and nothing is updated on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gpu_agent.service import AgentService

PREFIX = "gpu_agent"


class AgentCollector(Collector):
    """Reads `service.status()` on every scrape."""

    def __init__(self, service: AgentService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        """One metric family per gauge, built from a fresh status snapshot."""
        status = self._service.status()
        tel = status.telemetry

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels or [])

        up = gauge("telemetry_status", "1 for the current telemetry status", ["status"])
        for name in ("ok", "degraded", "no_gpu"):
            up.add_metric([name], 1.0 if tel.status == name else 0.0)
        yield up
        age = gauge("telemetry_age_seconds", "Age of the latest GPU sample")
        age.add_metric([], tel.age_s if tel.age_s is not None else float("nan"))
        yield age

        labels = ["gpu", "name"]
        families = {
            "memory_total": gauge("gpu_memory_total_bytes", "GPU memory in total", labels),
            "memory_used": gauge("gpu_memory_used_bytes", "GPU memory in use", labels),
            "memory_free": gauge("gpu_memory_free_bytes", "GPU memory free", labels),
            "util": gauge("gpu_utilization_percent", "GPU busy share of the last period", labels),
            "temp": gauge("gpu_temperature_celsius", "GPU core temperature", labels),
            "power": gauge("gpu_power_watts", "GPU board power draw", labels),
            "limit": gauge("gpu_power_limit_watts", "GPU enforced power limit", labels),
        }
        by_owner = gauge("gpu_memory_by_owner_bytes", "GPU memory per owner", ["gpu", "owner"])
        for gpu in tel.gpus:
            key = [str(gpu.index), gpu.name]
            families["memory_total"].add_metric(key, gpu.memory_total_bytes)
            families["memory_used"].add_metric(key, gpu.memory_used_bytes)
            families["memory_free"].add_metric(key, gpu.memory_free_bytes)
            optional = {
                "util": gpu.utilization_gpu_percent,
                "temp": gpu.temperature_c,
                "power": gpu.power_w,
                "limit": gpu.power_limit_w,
            }
            for family, value in optional.items():
                if value is not None:
                    families[family].add_metric(key, float(value))
            for owner in ("ollama", "comfyui", "other"):
                by_owner.add_metric(
                    [str(gpu.index), owner], gpu.memory_by_owner_bytes.get(owner, 0)
                )
        yield from families.values()
        yield by_owner

        ollama = status.ollama
        reachable = gauge("ollama_up", "1 when Ollama answers")
        reachable.add_metric([], 1.0 if ollama.reachable else 0.0)
        yield reachable
        resident = gauge("ollama_resident_models", "Models Ollama has loaded")
        resident.add_metric([], len(ollama.resident))
        yield resident
        vram = gauge("ollama_model_vram_bytes", "GPU memory of a loaded model", ["model"])
        size = gauge("ollama_model_size_bytes", "Total memory of a loaded model", ["model"])
        for model in ollama.resident:
            vram.add_metric([model.name], model.vram_bytes)
            size.add_metric([model.name], model.size_bytes)
        yield vram
        yield size
        in_flight = gauge("ollama_requests_in_flight", "Requests passing through", ["model"])
        for model_name, count in ollama.in_flight.items():
            in_flight.add_metric([model_name], count)
        yield in_flight

        comfy = status.comfyui
        comfy_up = gauge("comfyui_up", "1 when ComfyUI answers")
        comfy_up.add_metric([], 1.0 if comfy.reachable else 0.0)
        yield comfy_up
        conn = gauge("comfyui_connection", "1 for the current link to ComfyUI", ["mode"])
        for mode in ("websocket", "polling", "down"):
            conn.add_metric([mode], 1.0 if comfy.connection == mode else 0.0)
        yield conn
        queue = gauge("comfyui_queue_length", "Prompts in ComfyUI's queue", ["state"])
        queue.add_metric(["running"], comfy.queue_running)
        queue.add_metric(["pending"], comfy.queue_pending)
        yield queue


def make_registry(service: AgentService) -> CollectorRegistry:
    """A registry holding only the agent's collector (no process-global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(service))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, and the Content-Type to serve it with."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
