"""The ComfyUI prompt-state core: message sequences, reconciliation table, purity."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import gpu_agent.comfyui_state as core
from gpu_agent.comfyui_state import (
    Message,
    OutputFile,
    PromptTrack,
    apply_history,
    apply_message,
    new_track,
    outputs_from_history,
    outputs_from_ui,
    parse_message,
    queue_prompt_ids,
    reconcile,
    request_cancel,
)
from gpu_common.schema import FINAL_STATES, OOM_REASON, UNKNOWN_REASON

PID = "6f1c2a9e-3b7d-4e21-9c55-0a8f7d3e2b14"
OTHER = "0b9d7f4c-1e2a-4c3b-8d6e-5f7a9b1c3d2e"
T0 = datetime(2025, 10, 12, 9, 0, tzinfo=UTC)
OOM_MESSAGE = (
    "Allocation on device \nThis error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a "
    "large number."
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def msg(kind: str, **data: Any) -> Message:
    return Message(type=kind, data=data)


def image(name: str, folder: str = "", kind: str = "output") -> dict[str, str]:
    return {"filename": name, "subfolder": folder, "type": kind}


def fresh(nodes_total: int = 7) -> PromptTrack:
    return new_track(PID, submitted_at=T0, nodes_total=nodes_total)


def run(track: PromptTrack, *messages: Message) -> tuple[PromptTrack, list[str]]:
    """Feed messages in order; return the final track and the events announced."""
    events: list[str] = []
    for i, message in enumerate(messages):
        transition = apply_message(track, message, at(i + 1))
        track = transition.track
        if transition.event is not None:
            events.append(transition.event)
    return track, events


# The order a real ComfyUI 0.3.64 sends for an SD1.5 txt2img prompt (protocols.md B3b).
NORMAL_RUN = (
    msg("execution_start", prompt_id=PID, timestamp=1),
    msg("execution_cached", nodes=[], prompt_id=PID, timestamp=2),
    msg("progress_state", prompt_id=PID, nodes={}),
    msg("executing", node="4", display_node="4", prompt_id=PID),
    msg("executing", node="6", display_node="6", prompt_id=PID),
    msg("executing", node="7", display_node="7", prompt_id=PID),
    msg("executing", node="5", display_node="5", prompt_id=PID),
    msg("executing", node="3", display_node="3", prompt_id=PID),
    msg("progress", value=1, max=20, prompt_id=PID, node="3"),
    msg("progress", value=20, max=20, prompt_id=PID, node="3"),
    msg("executing", node="8", display_node="8", prompt_id=PID),
    msg("executing", node="9", display_node="9", prompt_id=PID),
    msg(
        "executed",
        node="9",
        display_node="9",
        output={"images": [image("ComfyUI_00001_.png")]},
        prompt_id=PID,
    ),
    msg("execution_success", prompt_id=PID, timestamp=3),
)


# -- message sequences ---------------------------------------------------------------------


def test_a_normal_run_goes_pending_running_succeeded_with_outputs() -> None:
    track = fresh()
    assert track.record.state == "pending"
    track, events = run(track, *NORMAL_RUN)
    record = track.record
    assert events[0] == "started"
    assert events[-1] == "finished"
    assert events.count("finished") == 1
    assert set(events[1:-1]) == {"progress"}
    assert record.state == "succeeded"
    assert record.started_at == at(1)
    assert record.finished_at == at(len(NORMAL_RUN))
    assert record.outputs == (OutputFile("9", "ComfyUI_00001_.png", "", "output"),)
    assert record.nodes_done == record.nodes_total == 7
    assert record.node is None
    assert record.step is None
    assert record.error is None
    assert record.reason == "finished with 1 output file"


def test_progress_tracks_node_steps_and_nodes_done() -> None:
    track, _ = run(fresh(), *NORMAL_RUN[:9])
    record = track.record
    assert record.state == "running"
    assert record.node == "3"
    assert (record.step, record.steps) == (1, 20)
    assert record.nodes_done == 4  # 4, 6, 7, 5 finished; 3 is running
    track, _ = run(track, NORMAL_RUN[10])
    assert track.record.node == "8"
    assert track.record.step is None  # a new node resets the step counter
    assert track.record.nodes_done == 5


def test_cached_nodes_count_as_done_and_cached_outputs_are_kept() -> None:
    track, events = run(
        fresh(),
        msg("execution_start", prompt_id=PID),
        msg("execution_cached", nodes=["4", "6", "7"], prompt_id=PID),
        msg("executing", node="3", prompt_id=PID),
        msg("executed", node="9", output={"images": [image("old_00001_.png")]}, prompt_id=PID),
    )
    assert track.record.nodes_done == 3
    assert track.record.outputs == (OutputFile("9", "old_00001_.png", "", "output"),)
    assert events == ["started", "progress", "progress", "progress"]


def test_messages_for_other_prompts_and_without_prompt_id_change_nothing() -> None:
    track = fresh()
    for message in (
        msg("execution_start", prompt_id=OTHER),
        msg("executing", node="3"),  # replayed on reconnect, without prompt_id
        msg("status", status={"exec_info": {"queue_remaining": 1}}),
        msg("execution_success", prompt_id=OTHER),
    ):
        transition = apply_message(track, message, at(1))
        assert transition.track == track
        assert transition.event is None


def test_run_evidence_without_execution_start_still_starts_the_prompt() -> None:
    track, events = run(fresh(), msg("progress", value=3, max=20, prompt_id=PID, node="3"))
    assert events == ["started"]
    assert track.record.state == "running"
    assert (track.record.node, track.record.step, track.record.steps) == ("3", 3, 20)
    assert not track.saw_start


def test_oom_error_fails_with_the_oom_reason() -> None:
    error = msg(
        "execution_error",
        prompt_id=PID,
        node_id="3",
        node_type="KSampler",
        executed=["4", "6", "7", "5"],
        exception_message=OOM_MESSAGE,
        exception_type="torch.OutOfMemoryError",
        traceback=[],
        current_inputs={},
        current_outputs=[],
    )
    track, events = run(fresh(), *NORMAL_RUN[:8], error)
    record = track.record
    assert events[-1] == "finished"
    assert record.state == "failed"
    assert record.reason == OOM_REASON
    assert record.error_type == "torch.OutOfMemoryError"
    assert record.error == "KSampler: Allocation on device"
    assert record.node == "3"
    assert record.nodes_done == 4


def test_other_errors_name_the_node_and_the_first_line() -> None:
    error = msg(
        "execution_error",
        prompt_id=PID,
        node_id="8",
        node_type="VAEDecode",
        exception_message="expected 4 channels\nmore detail",
        exception_type="RuntimeError",
    )
    track, _ = run(fresh(), msg("execution_start", prompt_id=PID), error)
    assert track.record.state == "failed"
    assert track.record.error == "VAEDecode: expected 4 channels"
    assert track.record.error_type == "RuntimeError"
    assert track.record.reason == "node 8 (VAEDecode) failed: expected 4 channels"


@pytest.mark.parametrize(
    ("cancel_requested", "state"), [(False, "interrupted"), (True, "cancelled")]
)
def test_interrupt_is_cancelled_only_when_we_asked(cancel_requested: bool, state: str) -> None:
    track, _ = run(fresh(), *NORMAL_RUN[:9])
    if cancel_requested:
        track = request_cancel(track)
    interrupted = msg("execution_interrupted", prompt_id=PID, node_id="3", node_type="KSampler")
    track, events = run(track, interrupted)
    assert events == ["finished"]
    assert track.record.state == state
    assert track.record.reason
    assert track.record.error is None


def test_a_final_record_never_moves() -> None:
    track, _ = run(fresh(), *NORMAL_RUN)
    done = track.record
    late = (
        msg("execution_error", prompt_id=PID, node_id="3", exception_message="x"),
        msg("execution_interrupted", prompt_id=PID),
        msg("execution_start", prompt_id=PID),
        msg("progress", value=1, max=2, prompt_id=PID),
    )
    for message in late:
        transition = apply_message(track, message, at(99))
        assert transition.track.record == done
        assert transition.event is None
    for running, pending in ((RUNNING, NONE), (NONE, NONE)):
        transition = reconcile(
            track, running_ids=running, pending_ids=pending, history=None, now=at(99)
        )
        assert transition.track.record == done
    assert request_cancel(track) == track


def test_done_marker_asks_for_history_only_when_something_may_be_missing() -> None:
    done = msg("executing", node=None, prompt_id=PID)
    seen_whole_run, _ = run(fresh(), *NORMAL_RUN)
    assert not apply_message(seen_whole_run, done, at(50)).want_history
    joined_late, _ = run(fresh(), *NORMAL_RUN[5:])
    assert joined_late.record.state == "succeeded"
    assert apply_message(joined_late, done, at(50)).want_history
    outcome_missed, _ = run(fresh(), *NORMAL_RUN[:5])
    transition = apply_message(outcome_missed, done, at(50))
    assert transition.want_history
    assert transition.track == outcome_missed


# -- parsing -------------------------------------------------------------------------------


def test_parse_message_accepts_typed_objects_only() -> None:
    text = json.dumps({"type": "progress", "data": {"value": 1, "max": 2, "prompt_id": PID}})
    parsed = parse_message(text)
    assert parsed is not None
    assert parsed.type == "progress"
    assert parsed.prompt_id == PID
    assert parse_message("not json") is None
    assert parse_message("[1, 2]") is None
    assert parse_message(json.dumps({"data": {}})) is None
    no_data = parse_message(json.dumps({"type": "status"}))
    assert no_data is not None
    assert no_data.data == {}
    assert no_data.prompt_id is None


def test_outputs_read_every_file_list_and_skip_other_values() -> None:
    output = {
        "images": [image("a.png"), image("b.png", "sub", "temp")],
        "text": ["hello"],
        "gifs": [image("c.webp")],
        "animated": [True],
    }
    assert outputs_from_ui("9", output) == (
        OutputFile("9", "a.png", "", "output"),
        OutputFile("9", "b.png", "sub", "temp"),
        OutputFile("9", "c.webp", "", "output"),
    )
    assert outputs_from_ui("9", None) == ()
    entry = {"outputs": {"9": {"images": [image("a.png")]}, "12": {"images": [image("d.png")]}}}
    assert [f.node_id for f in outputs_from_history(entry)] == ["9", "12"]


def test_queue_ids_come_from_the_second_tuple_element() -> None:
    queue = {
        "queue_running": [[3, PID, {}, {"client_id": "x"}, ["9"]]],
        "queue_pending": [[4, OTHER, {}, {}, ["9"]], [5, "c", {}, {}, ["9"]]],
    }
    assert queue_prompt_ids(queue) == (frozenset({PID}), frozenset({OTHER, "c"}))
    assert queue_prompt_ids({}) == (frozenset(), frozenset())


# -- reconciliation ------------------------------------------------------------------------


def history_entry(status_str: str, *events: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    messages = [["execution_start", {"prompt_id": PID, "timestamp": 1}], *map(list, events)]
    return {
        "prompt": [3, PID, {}, {}, ["9"]],
        "outputs": {"9": {"images": [image("ComfyUI_00002_.png")]}}
        if status_str == "success"
        else {},
        "status": {
            "status_str": status_str,
            "completed": status_str == "success",
            "messages": messages,
        },
        "meta": {},
    }


SUCCESS = history_entry("success", ("execution_success", {"prompt_id": PID}))
ERROR = history_entry(
    "error",
    (
        "execution_error",
        {
            "prompt_id": PID,
            "node_id": "3",
            "node_type": "KSampler",
            "exception_message": OOM_MESSAGE,
            "exception_type": "torch.OutOfMemoryError",
        },
    ),
)
INTERRUPTED = history_entry(
    "error", ("execution_interrupted", {"prompt_id": PID, "node_id": "3", "node_type": "KSampler"})
)
RUNNING = frozenset({PID})
NONE: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    ("start", "cancel", "running", "pending", "history", "state", "event"),
    [
        # history (read after the queue) decides first
        ("pending", False, NONE, NONE, SUCCESS, "succeeded", "finished"),
        ("running", False, NONE, NONE, SUCCESS, "succeeded", "finished"),
        ("running", False, NONE, NONE, ERROR, "failed", "finished"),
        ("running", False, NONE, NONE, INTERRUPTED, "interrupted", "finished"),
        ("running", True, NONE, NONE, INTERRUPTED, "cancelled", "finished"),
        # then the queue
        ("pending", False, RUNNING, NONE, None, "running", "started"),
        ("running", False, RUNNING, NONE, None, "running", None),
        ("pending", False, NONE, RUNNING, None, "pending", None),
        ("running", False, NONE, RUNNING, None, "running", None),  # never back to pending
        # absent everywhere
        ("pending", False, NONE, NONE, None, "unknown", "finished"),
        ("running", False, NONE, NONE, None, "unknown", "finished"),
        ("running", True, NONE, NONE, None, "unknown", "finished"),
        ("pending", True, NONE, NONE, None, "cancelled", "finished"),
        # a history entry without a status is not an outcome
        ("running", False, RUNNING, NONE, {"outputs": {}}, "running", None),
    ],
)
def test_reconciliation_table(
    start: str,
    cancel: bool,
    running: frozenset[str],
    pending: frozenset[str],
    history: dict[str, Any] | None,
    state: str,
    event: str | None,
) -> None:
    track = fresh()
    if start == "running":
        track, _ = run(track, msg("execution_start", prompt_id=PID))
    if cancel:
        track = request_cancel(track)
    transition = reconcile(
        track, running_ids=running, pending_ids=pending, history=history, now=at(30)
    )
    record = transition.track.record
    assert record.state == state
    assert transition.event == event
    if state in FINAL_STATES:
        assert record.finished_at == at(30)
        assert record.reason
    if state == "running" and start == "pending":
        assert record.started_at == at(30)


def test_reconciled_outcomes_carry_history_details() -> None:
    track, _ = run(fresh(), msg("execution_start", prompt_id=PID))
    kwargs: dict[str, Any] = {"running_ids": NONE, "pending_ids": NONE, "now": at(30)}
    ok = reconcile(track, history=SUCCESS, **kwargs).track.record
    assert ok.outputs == (OutputFile("9", "ComfyUI_00002_.png", "", "output"),)
    failed = reconcile(track, history=ERROR, **kwargs).track.record
    assert (failed.reason, failed.error_type) == (OOM_REASON, "torch.OutOfMemoryError")
    assert failed.error == "KSampler: Allocation on device"
    lost = reconcile(track, history=None, **kwargs).track.record
    assert lost.reason == UNKNOWN_REASON
    assert lost.error_type == "restart"
    assert lost.error


def test_history_fills_missing_outputs_of_a_success_without_moving_it() -> None:
    track, _ = run(fresh(), *NORMAL_RUN[5:])
    before = track.record
    after = apply_history(track, SUCCESS, at(60))
    assert after.event is None
    assert after.track.record.state == "succeeded"
    assert after.track.record.finished_at == before.finished_at
    assert [f.filename for f in after.track.record.outputs] == [
        "ComfyUI_00001_.png",
        "ComfyUI_00002_.png",
    ]
    # Other final states gain nothing from history.
    unknown = reconcile(fresh(), running_ids=NONE, pending_ids=NONE, history=None, now=at(1))
    assert apply_history(unknown.track, SUCCESS, at(60)).track == unknown.track


# -- purity --------------------------------------------------------------------------------


def test_the_core_does_no_io() -> None:
    source = Path(core.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            # The wire schema's state names are values; anything else of ours would be I/O.
            module = node.module
            imported.add(module if module == "gpu_common.schema" else module.split(".")[0])
    allowed = {"__future__", "collections", "dataclasses", "datetime", "json", "typing"}
    allowed.add("gpu_common.schema")
    assert imported <= allowed, imported - allowed
