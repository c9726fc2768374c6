"""The ledger's own bookkeeping (`AgentBook.observe`) from agent snapshots."""

from __future__ import annotations

from datetime import UTC, datetime

from controller.domain.types import RunningImage
from controller.ledger import AgentBook, agent_state
from gpu_common.schema import AgentStatus, ComfyUIInfo, GpuInfo, OllamaInfo, TelemetryInfo

MIB = 1024**2
GIB = 1024 * MIB
TOTAL = 12 * 1024 * MIB
CONTEXT = 400 * MIB
NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def status(comfy_bytes: int, *, comfy_up: bool, other_bytes: int = 600 * MIB) -> AgentStatus:
    """A snapshot of one GPU where ComfyUI holds `comfy_bytes` and the desktop `other_bytes`."""
    used = comfy_bytes + other_bytes
    gpu = GpuInfo(
        index=0,
        uuid="GPU-0",
        name="sim",
        memory_total_bytes=TOTAL,
        memory_used_bytes=used,
        memory_free_bytes=TOTAL - used,
        memory_reserved_bytes=0,
        utilization_gpu_percent=0,
        utilization_memory_percent=0,
        temperature_c=40,
        power_w=20.0,
        power_limit_w=220.0,
        memory_by_owner_bytes={"comfyui": comfy_bytes, "ollama": 0, "other": other_bytes},
        processes=[],
    )
    return AgentStatus(
        agent="desk",
        version="1",
        started_at=NOW,
        now=NOW,
        telemetry=TelemetryInfo(
            status="ok",
            reason=None,
            backend="sim",
            driver_version=None,
            taken_at=NOW,
            age_s=0.0,
            sample_interval_s=1.0,
            gpus=[gpu],
            host=None,
        ),
        ollama=OllamaInfo(
            reachable=True,
            error=None,
            version="0",
            checked_at=NOW,
            available=[],
            resident=[],
            in_flight={},
        ),
        comfyui=ComfyUIInfo(
            reachable=comfy_up,
            connection="websocket" if comfy_up else "down",
            last_message_age_s=None,
            queue_running=0,
            queue_pending=0,
            prompts=[],
        ),
    )


def test_comfyui_down_does_not_lower_its_floor() -> None:
    """While ComfyUI is down (restarting) it holds nothing; that is not its floor.

    Found by the chaos day (seed 1): a floor of 0 learned during a ComfyUI restart made the
    next process's CUDA context count as freeable cache, so a model was loaded into room that
    was not there and spilled to the CPU."""
    book = AgentBook("desk")
    book.observe(status(CONTEXT, comfy_up=True), 0.0)
    book.observe(status(0, comfy_up=False), 1.0)
    book.observe(status(CONTEXT + 4000 * MIB, comfy_up=True), 2.0)
    assert book.comfy_floor == CONTEXT
    state = agent_state(
        book,
        status(CONTEXT + 4000 * MIB, comfy_up=True),
        healthy=True,
        reason=None,
        reserve_bytes=512 * MIB,
        now=2.0,
    )
    assert state.comfy_freeable_bytes == 4000 * MIB


def test_a_running_comfyui_teaches_its_floor() -> None:
    """The lowest figure a running ComfyUI showed while idle is its floor."""
    book = AgentBook("desk")
    book.observe(status(CONTEXT + 512 * MIB, comfy_up=True), 0.0)
    book.observe(status(CONTEXT, comfy_up=True), 1.0)
    assert book.comfy_floor == CONTEXT


def test_an_ended_image_job_stays_counted_until_snapshots_show_what_comfyui_kept() -> None:
    """An image job that ended between two snapshots still counts until the snapshots show
    what ComfyUI kept of it (its checkpoint stays cached).

    Found by the chaos day (seed 1): the job's promise was dropped at its end while the latest
    snapshot predated its checkpoint load, so a model was loaded into memory ComfyUI held and
    spilled to the CPU."""
    need = 2100 * MIB
    book = AgentBook("desk")
    before = status(CONTEXT, comfy_up=True)
    book.observe(before, 0.0)
    book.start_image(RunningImage("job", need, "sd15", 0.0), need, CONTEXT)
    book.finish_image("sd15")

    def pending() -> int:
        state = agent_state(
            book, before, healthy=True, reason=None, reserve_bytes=512 * MIB, now=1.0
        )
        return state.pending_bytes

    assert pending() == need
    book.observe(before, 1.0)
    assert pending() == need
    book.observe(status(CONTEXT + need, comfy_up=True), 2.0)
    assert pending() == 0


def test_an_admission_given_back_is_not_counted() -> None:
    """An image admission that never ran leaves nothing pending."""
    book = AgentBook("desk")
    before = status(CONTEXT, comfy_up=True)
    book.observe(before, 0.0)
    book.start_image(RunningImage("job", GIB, "sd15", 0.0), GIB, CONTEXT)
    book.finish_image(None, ran=False)
    state = agent_state(book, before, healthy=True, reason=None, reserve_bytes=0, now=1.0)
    assert state.pending_bytes == 0
