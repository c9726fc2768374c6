"""The dashboard's parts that need no server: the hour of history, the sessions, and the core's
rule for unloading a model by hand."""

from __future__ import annotations

from controller.dashboard.history import MemoryHistory
from controller.dashboard.sessions import SessionBook
from controller.domain.operator import unload_refusal
from gpu_common.schema import GpuInfo

from .policy_fixtures import GIB, desktop, resident


def gpu(index: int = 0, *, ollama: int = 0, comfyui: int = 0, desktop_bytes: int = 0) -> GpuInfo:
    used = ollama + comfyui + desktop_bytes + 100 * 1024**2  # the driver's own
    return GpuInfo(
        index=index, uuid=f"GPU-{index}", name="RTX", memory_total_bytes=12 * GIB,
        memory_used_bytes=used, memory_free_bytes=12 * GIB - used, memory_reserved_bytes=None,
        utilization_gpu_percent=50, utilization_memory_percent=None, temperature_c=60,
        power_w=120.0, power_limit_w=220.0,
        memory_by_owner_bytes={"ollama": ollama, "comfyui": comfyui, "other": desktop_bytes},
        processes=[],
    )  # fmt: skip


class Clock:
    """A hand-moved clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_history_keeps_one_point_per_spacing_and_an_hour_at_most() -> None:
    history = MemoryHistory(window_s=3600, spacing_s=1.0, max_gpus=2)
    reading = gpu(ollama=10 * GIB, comfyui=GIB, desktop_bytes=GIB // 2)
    assert history.add("desk", reading, 11 * GIB, at_s=0.0, wall_s=1e9)
    assert not history.add("desk", reading, 11 * GIB, at_s=0.5, wall_s=1e9 + 0.5)
    assert history.add("desk", gpu(index=1), 11 * GIB, at_s=0.5, wall_s=1e9 + 0.5)
    for second in range(1, 5000):
        history.add("desk", reading, 11 * GIB, at_s=float(second), wall_s=1e9 + second)
    assert len(history) <= 2 * 3601
    (series,) = history.series()  # GPU 1's lone point fell out of the hour
    assert series.t[-1] - series.t[0] <= 3600
    assert series.ollama_gib[-1] == 10.0
    assert series.desktop_gib[-1] == 0.5
    assert series.other_gib[-1] == round(100 / 1024, 3)
    assert series.budget_gib[-1] == 11.0
    assert (series.utilization_percent[-1], series.temperature_c[-1]) == (50, 60)


def test_history_hands_out_only_what_is_new() -> None:
    history = MemoryHistory()
    history.add("desk", gpu(), GIB, at_s=0.0, wall_s=0.0)
    seen = history.last_seq
    assert history.series(seen) == []
    history.add("desk", gpu(), GIB, at_s=1.0, wall_s=1.0)
    (series,) = history.series(seen)
    assert series.t == [1.0]


def test_sessions_expire_when_idle_and_a_full_book_drops_the_oldest() -> None:
    clock = Clock()
    book = SessionBook(clock, idle_s=60.0, max_sessions=2)
    first = book.open()
    assert book.find(first.session_id) is first
    assert book.find("made-up") is None
    assert book.find(None) is None
    assert book.csrf_matches(first, first.csrf)
    assert not book.csrf_matches(first, "wrong")
    assert not book.csrf_matches(first, None)
    assert not book.csrf_matches(first, "é")
    clock.now += 59.0
    assert book.find(first.session_id) is first  # used: its expiry moves on
    clock.now += 59.0
    second, third = book.open(), book.open()
    assert book.find(first.session_id) is None  # the book was full: the oldest went
    assert book.find(second.session_id) is second
    clock.now += 61.0
    assert book.find(third.session_id) is None
    book.close(second.session_id)
    assert book.find(second.session_id) is None


def test_only_an_idle_resident_model_on_a_healthy_agent_is_unloaded_by_hand() -> None:
    big = "qwen2.5:14b"
    assert unload_refusal(desktop(resident(big)), big) is None
    busy = unload_refusal(desktop(resident(big, in_flight=2)), big)
    assert busy is not None
    assert "2 requests in flight" in busy
    missing = unload_refusal(desktop(), big)
    assert missing is not None
    assert "not resident" in missing
    sick = unload_refusal(desktop(resident(big), healthy=False, unhealthy_reason="stale"), big)
    assert sick is not None
    assert "stale" in sick
    queued = unload_refusal(desktop(resident(big), llm_queued=((big, 1),)), big)
    assert queued is not None
    assert "waiting" in queued
