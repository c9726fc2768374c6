"""Realistic values for policy-core tests: a 4070 SUPER desktop and the studio's models."""

from __future__ import annotations

from controller.domain.types import AgentState, ModelProfile, ResidentModel

GIB = 1024**3
MIB = 1024**2
TOTAL = 12282 * MIB
DESKTOP = 600 * MIB
COMFY_CONTEXT = 400 * MIB
RESERVE = 512 * MIB

CATALOG = {
    p.name: p
    for p in (
        ModelProfile("llama3.2:3b", 54.8, 3 * GIB, 3 * GIB, 165.0, 9000.0, 1.2),
        ModelProfile("qwen2.5:7b", 70.3, int(5.25 * GIB), int(5.25 * GIB), 80.0, 4000.0, 1.8),
        ModelProfile("qwen2.5:14b", 80.8, 10 * GIB, 10 * GIB, 45.0, 2000.0, 2.3),
        ModelProfile(
            "mistral-small:latest", 85.4, int(14.5 * GIB), int(14.5 * GIB), 9.0, 400.0, 3.5
        ),
    )
}


def resident(
    name: str, *, in_flight: int = 0, loaded_at: float = 0.0, last_used_at: float = 0.0
) -> ResidentModel:
    size = CATALOG[name].vram_bytes
    return ResidentModel(name, size, size, in_flight, loaded_at, last_used_at)


def desktop(
    *models: ResidentModel,
    name: str = "desk",
    comfy_bytes: int = COMFY_CONTEXT,
    comfy_family: str | None = None,
    healthy: bool = True,
    **extra: object,
) -> AgentState:
    used = DESKTOP + comfy_bytes + sum(m.vram_bytes for m in models)
    return AgentState(
        name=name,
        healthy=healthy,
        total_bytes=TOTAL,
        used_bytes=used,
        reserve_bytes=RESERVE,
        resident=tuple(models),
        comfy_bytes=comfy_bytes,
        comfy_floor_bytes=COMFY_CONTEXT,
        comfy_family=comfy_family,
        **extra,  # type: ignore[arg-type]
    )
