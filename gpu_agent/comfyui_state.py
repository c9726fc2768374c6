"""What the agent knows about each ComfyUI prompt, and the rules that change it.

Functional core of the ComfyUI adapter (`gpu_agent.comfyui` is the I/O shell): plain values in,
a new value and the event to announce out. No sockets, no event loop, no clock reads; `now` is
passed in. Three inputs move a prompt:

* a websocket message (`apply_message`), in the order ComfyUI sends them;
* a reconciliation against `/queue` and `/history/{id}` after a gap (`reconcile`);
* our own cancel request (`request_cancel`).

A final record never changes state again, so a late or replayed message cannot rewrite an outcome.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from gpu_common.schema import FINAL_STATES, OOM_REASON, UNKNOWN_REASON, PromptState

EventKind = Literal["submitted", "started", "progress", "finished"]

# The sentence ComfyUI appends to a CUDA out-of-memory exception (execution.py), and torch's own.
_OOM_MARKERS = ("ran out of memory on your gpu", "out of memory")
UNKNOWN_ERROR = "the prompt is in neither ComfyUI's queue nor its history"
UNKNOWN_ERROR_TYPE = "restart"


@dataclass(frozen=True)
class OutputFile:
    """One file a prompt produced, named as in `executed` messages and history outputs."""

    node_id: str
    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True)
class PromptRecord:
    """The public view of one prompt.

    `error` is set for `failed` (first line of ComfyUI's exception message and the node type) and
    `unknown` (why); `reason` is a human sentence for every final state. `started_at` stays None
    when the start was never observed (the prompt finished while we were not connected).
    """

    prompt_id: str
    state: PromptState
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    node: str | None
    step: int | None
    steps: int | None
    nodes_done: int
    nodes_total: int
    outputs: tuple[OutputFile, ...]
    error: str | None
    error_type: str | None
    reason: str | None

    @property
    def final(self) -> bool:
        """Whether the prompt has ended: a final record never changes again."""
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class PromptEvent:
    """A change worth announcing: "submitted", "started", "progress" or "finished"."""

    kind: EventKind
    record: PromptRecord


@dataclass(frozen=True)
class PromptTrack:
    """A record plus the bookkeeping needed to advance it (not part of the public view)."""

    record: PromptRecord
    cancel_requested: bool = False
    # Nodes that started executing or were reported cached, to count nodes_done.
    nodes_seen: frozenset[str] = frozenset()
    # Whether execution_start was seen: if not, some `executed` outputs may have been missed.
    saw_start: bool = False


@dataclass(frozen=True)
class Transition:
    """The outcome of one input: the new track and the event to announce, if any.

    `want_history` asks the shell to read `/history/{id}` (the prompt is done but its outputs may
    be incomplete, or its outcome was not seen).
    """

    track: PromptTrack
    event: EventKind | None = None
    want_history: bool = False


@dataclass(frozen=True)
class Message:
    """One websocket text frame: `{"type": ..., "data": {...}}`."""

    type: str
    data: Mapping[str, Any]

    @property
    def prompt_id(self) -> str | None:
        value = self.data.get("prompt_id")
        return value if isinstance(value, str) else None


def new_track(prompt_id: str, *, submitted_at: datetime, nodes_total: int) -> PromptTrack:
    """A freshly queued prompt."""
    record = PromptRecord(
        prompt_id=prompt_id,
        state="pending",
        submitted_at=submitted_at,
        started_at=None,
        finished_at=None,
        node=None,
        step=None,
        steps=None,
        nodes_done=0,
        nodes_total=nodes_total,
        outputs=(),
        error=None,
        error_type=None,
        reason=None,
    )
    return PromptTrack(record=record)


def parse_message(text: str) -> Message | None:
    """Parse a text frame; None for anything that is not a typed JSON object."""
    try:
        payload = json.loads(text)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    kind = payload.get("type")
    data = payload.get("data")
    if not isinstance(kind, str):
        return None
    return Message(type=kind, data=data if isinstance(data, dict) else {})


# -- outputs -------------------------------------------------------------------------------


def outputs_from_ui(node_id: str, output: Any) -> tuple[OutputFile, ...]:
    """Files in one node's UI output (`{"images": [{filename, subfolder, type}], ...}`).

    Every list of file dicts counts (images, gifs, audio...); other values (text) are skipped.
    """
    if not isinstance(output, Mapping):
        return ()
    files: list[OutputFile] = []
    for items in output.values():
        if not isinstance(items, list):
            continue
        for item in items:
            if isinstance(item, Mapping) and isinstance(item.get("filename"), str):
                files.append(
                    OutputFile(
                        node_id=str(node_id),
                        filename=item["filename"],
                        subfolder=str(item.get("subfolder") or ""),
                        type=str(item.get("type") or "output"),
                    )
                )
    return tuple(files)


def outputs_from_history(entry: Mapping[str, Any]) -> tuple[OutputFile, ...]:
    """Every file in a history entry's `outputs`, in ComfyUI's node order."""
    outputs = entry.get("outputs")
    if not isinstance(outputs, Mapping):
        return ()
    files: list[OutputFile] = []
    for node_id, output in outputs.items():
        files.extend(outputs_from_ui(str(node_id), output))
    return tuple(files)


def _merge_outputs(
    known: tuple[OutputFile, ...], extra: tuple[OutputFile, ...]
) -> tuple[OutputFile, ...]:
    seen = set(known)
    merged = list(known)
    for item in extra:
        if item not in seen:
            seen.add(item)
            merged.append(item)
    return tuple(merged)


# -- failure description -------------------------------------------------------------------


def is_out_of_memory(exception_message: str, exception_type: str | None) -> bool:
    """Whether ComfyUI's error says the GPU ran out of memory."""
    text = exception_message.lower()
    if any(marker in text for marker in _OOM_MARKERS):
        return True
    return exception_type is not None and "outofmemory" in exception_type.lower()


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _failure_fields(data: Mapping[str, Any]) -> tuple[str, str | None, str, str | None]:
    """(error, error_type, reason, node id) for an `execution_error` payload."""
    message = str(data.get("exception_message") or "")
    exception_type = data.get("exception_type")
    error_type = str(exception_type) if exception_type else None
    node_type = str(data.get("node_type") or "unknown node")
    node_id = data.get("node_id")
    node = str(node_id) if node_id is not None else None
    first = _first_line(message) or "no message"
    error = f"{node_type}: {first}"
    if is_out_of_memory(message, error_type):
        reason = OOM_REASON
    else:
        where = f"node {node} ({node_type})" if node is not None else node_type
        reason = f"{where} failed: {first}"
    return error, error_type, reason, node


# -- finishing -----------------------------------------------------------------------------


def _finish(track: PromptTrack, now: datetime, **changes: Any) -> PromptTrack:
    record = replace(track.record, finished_at=now, step=None, steps=None, **changes)
    return replace(track, record=record)


def _succeed(
    track: PromptTrack, now: datetime, extra_outputs: tuple[OutputFile, ...] = ()
) -> PromptTrack:
    outputs = _merge_outputs(track.record.outputs, extra_outputs)
    count = len(outputs)
    reason = f"finished with {count} output file{'s' if count != 1 else ''}"
    return _finish(
        track,
        now,
        state="succeeded",
        node=None,
        nodes_done=track.record.nodes_total,
        outputs=outputs,
        reason=reason,
    )


def _fail(track: PromptTrack, now: datetime, data: Mapping[str, Any]) -> PromptTrack:
    error, error_type, reason, node = _failure_fields(data)
    done = len(track.nodes_seen - {node}) if node is not None else len(track.nodes_seen)
    return _finish(
        track,
        now,
        state="failed",
        node=node,
        nodes_done=done,
        error=error,
        error_type=error_type,
        reason=reason,
    )


def _interrupt(track: PromptTrack, now: datetime, data: Mapping[str, Any]) -> PromptTrack:
    node_id = data.get("node_id")
    node = str(node_id) if node_id is not None else track.record.node
    if track.cancel_requested:
        state: PromptState = "cancelled"
        reason = "cancelled on request while it was running"
    else:
        state = "interrupted"
        reason = "interrupted in ComfyUI before it finished"
    return _finish(track, now, state=state, node=node, reason=reason)


def _cancel_unstarted(track: PromptTrack, now: datetime) -> PromptTrack:
    return _finish(
        track, now, state="cancelled", node=None, reason="cancelled on request before it started"
    )


def _forget(track: PromptTrack, now: datetime) -> PromptTrack:
    return _finish(
        track,
        now,
        state="unknown",
        node=None,
        error=UNKNOWN_ERROR,
        error_type=UNKNOWN_ERROR_TYPE,
        reason=UNKNOWN_REASON,
    )


def _start(track: PromptTrack, now: datetime) -> PromptTrack:
    if track.record.state != "pending":
        return track
    return replace(track, record=replace(track.record, state="running", started_at=now))


def _done_count(nodes_seen: frozenset[str], current: str | None) -> int:
    return len(nodes_seen - {current}) if current is not None else len(nodes_seen)


# -- websocket messages --------------------------------------------------------------------

# Messages that prove the prompt is executing, even if execution_start was missed.
_RUN_EVIDENCE = frozenset(
    {"execution_start", "execution_cached", "executing", "progress", "executed"}
)


def apply_message(track: PromptTrack, message: Message, now: datetime) -> Transition:
    """Advance `track` by one websocket message addressed to its prompt.

    The caller routes by `message.prompt_id`; messages for other prompts must not be passed.
    """
    if message.prompt_id != track.record.prompt_id:
        return Transition(track)
    kind = message.type
    data = message.data
    record = track.record
    if kind == "executing" and data.get("node") is None:
        # The done marker comes after history is written. History settles a missed outcome and
        # fills outputs whose `executed` messages we missed (we joined after execution_start).
        unsure = not record.final or (
            record.state == "succeeded" and (not track.saw_start or not record.outputs)
        )
        return Transition(track, want_history=unsure)
    if record.final:
        return Transition(track)
    if kind == "execution_success":
        return Transition(_succeed(track, now), "finished")
    if kind == "execution_error":
        return Transition(_fail(track, now, data), "finished")
    if kind == "execution_interrupted":
        return Transition(_interrupt(track, now, data), "finished")
    if kind not in _RUN_EVIDENCE:
        return Transition(track)

    was_pending = track.record.state == "pending"
    track = _start(track, now)
    record = track.record
    if kind == "execution_start":
        track = replace(track, saw_start=True)
    elif kind == "execution_cached":
        nodes = data.get("nodes")
        cached = frozenset(str(n) for n in nodes) if isinstance(nodes, list) else frozenset()
        seen = track.nodes_seen | cached
        record = replace(record, nodes_done=_done_count(seen, record.node))
        track = replace(track, nodes_seen=seen, record=record)
    elif kind == "executing":
        node = str(data["node"])
        seen = track.nodes_seen | {node}
        record = replace(
            record, node=node, step=None, steps=None, nodes_done=_done_count(seen, node)
        )
        track = replace(track, nodes_seen=seen, record=record)
    elif kind == "progress":
        value, maximum = data.get("value"), data.get("max")
        if isinstance(value, int) and isinstance(maximum, int):
            progress_node = data.get("node")
            record = replace(
                record,
                step=value,
                steps=maximum,
                node=str(progress_node) if progress_node is not None else record.node,
            )
            track = replace(track, record=record)
    elif kind == "executed":
        node_id = data.get("node")
        if node_id is not None:
            files = outputs_from_ui(str(node_id), data.get("output"))
            record = replace(record, outputs=_merge_outputs(record.outputs, files))
            track = replace(track, record=record)
    if was_pending:
        return Transition(track, "started")
    return Transition(track, "progress")


# -- reconciliation ------------------------------------------------------------------------


def queue_prompt_ids(queue: Mapping[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """(running ids, pending ids) from a `GET /queue` body; items are `[number, id, ...]`."""

    def ids(key: str) -> frozenset[str]:
        items = queue.get(key)
        if not isinstance(items, list):
            return frozenset()
        return frozenset(
            str(item[1]) for item in items if isinstance(item, list | tuple) and len(item) > 1
        )

    return ids("queue_running"), ids("queue_pending")


def _history_event(entry: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    status = entry.get("status")
    messages = status.get("messages") if isinstance(status, Mapping) else None
    if not isinstance(messages, list):
        return None
    for item in messages:
        if (
            isinstance(item, list | tuple)
            and len(item) == 2
            and item[0] == kind
            and isinstance(item[1], Mapping)
        ):
            return item[1]
    return None


def history_outcome(entry: Mapping[str, Any]) -> Literal["success", "error"] | None:
    """Whether a history entry records a finished prompt; None if it has no usable status."""
    status = entry.get("status")
    if not isinstance(status, Mapping):
        return None
    status_str = status.get("status_str")
    if status_str == "success":
        return "success"
    if status_str == "error":
        return "error"
    if status.get("completed") is True:
        return "success"
    return None


def apply_history(track: PromptTrack, entry: Mapping[str, Any], now: datetime) -> Transition:
    """Settle `track` from its history entry; a final record only gains missing outputs."""
    outcome = history_outcome(entry)
    if outcome is None:
        return Transition(track)
    if track.record.final:
        if track.record.state == "succeeded" and outcome == "success":
            outputs = _merge_outputs(track.record.outputs, outputs_from_history(entry))
            if outputs != track.record.outputs:
                return Transition(replace(track, record=replace(track.record, outputs=outputs)))
        return Transition(track)
    if outcome == "success":
        return Transition(_succeed(track, now, outputs_from_history(entry)), "finished")
    interrupted = _history_event(entry, "execution_interrupted")
    if interrupted is not None:
        return Transition(_interrupt(track, now, interrupted), "finished")
    failure = _history_event(entry, "execution_error")
    if failure is None:
        failure = {"exception_message": "ComfyUI recorded an error without details"}
    return Transition(_fail(track, now, failure), "finished")


def reconcile(
    track: PromptTrack,
    *,
    running_ids: Collection[str],
    pending_ids: Collection[str],
    history: Mapping[str, Any] | None,
    now: datetime,
    saved: tuple[OutputFile, ...] = (),
) -> Transition:
    """Settle `track` against what ComfyUI reports after a gap.

    `history` is the prompt's `/history/{id}` entry (None when `{}`), and it must have been read
    *after* the queue: a prompt that finished between the two reads is then in the history, so
    "absent everywhere" really means ComfyUI lost it (it restarted), unless we asked to cancel it
    before it started (we deleted it from the pending queue, which leaves no history), or it
    finished before the restart: then its pictures are `saved` on disk (`comfyui_outputs`),
    and they are its outputs. A final record keeps its state.
    """
    if history is not None and history_outcome(history) is not None:
        return apply_history(track, history, now)
    if track.record.final:
        return Transition(track)
    prompt_id = track.record.prompt_id
    if prompt_id in running_ids:
        if track.record.state == "pending":
            return Transition(_start(track, now), "started")
        return Transition(track)
    if prompt_id in pending_ids:
        # Never back to pending: a running record only looks pending in a stale read.
        return Transition(track)
    if track.cancel_requested and track.record.state == "pending":
        return Transition(_cancel_unstarted(track, now), "finished")
    if saved:
        return Transition(_succeed(track, now, saved), "finished")
    return Transition(_forget(track, now), "finished")


def request_cancel(track: PromptTrack) -> PromptTrack:
    """Remember that we asked for this prompt to stop, so its interrupt reads as cancelled."""
    if track.record.final or track.cancel_requested:
        return track
    return replace(track, cancel_requested=True)
