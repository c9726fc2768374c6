"""The agent's ComfyUI adapter: submits prompts and follows them to a certain outcome.

Adapter layer (I/O shell). The prompt-state rules live in `gpu_agent.comfyui_state`; this module
only moves bytes: HTTP calls through one httpx client, and one persistent websocket
(`/ws?clientId=<client_id>`) carrying the execution events ComfyUI sends to the submitting client.

The socket can drop, stall or miss a restart, so the follower never trusts it alone:

* a dropped socket reconnects with exponential backoff and jitter;
* while it is down, or quiet for `quiet_after_s` with prompts outstanding, `/queue` and
  `/history/{id}` are polled every `poll_interval_s` (`connection == "polling"`);
* after every (re)connect every outstanding prompt is reconciled against `/queue` and then
  `/history/{id}`, so an outcome missed during the gap is found and a prompt ComfyUI forgot
  (it restarted) becomes `unknown` instead of waiting forever;
* a socket that stays open but missed an outcome that polling found is closed and reopened:
  ComfyUI keeps one socket per client id and forgets the id when an *older* socket of that id
  closes, which leaves the newer one connected but deaf.

Every HTTP failure is converted to the `ComfyUIError` tree in `_request`, the one chokepoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from gpu_agent.comfyui_outputs import MAX_FILES_PER_NODE, SavedImageProbe, tag_outputs
from gpu_agent.comfyui_state import (
    EventKind,
    OutputFile,
    PromptEvent,
    PromptRecord,
    PromptTrack,
    Transition,
    apply_history,
    apply_message,
    new_track,
    parse_message,
    queue_prompt_ids,
    reconcile,
    request_cancel,
)
from gpu_agent.errors import (
    ComfyUIError,
    ComfyUIUnavailable,
    OutputNotFound,
    PromptNotFound,
    UploadRejected,
    WorkflowRejected,
)
from gpu_common import clock
from gpu_common.backoff import Backoff
from gpu_common.schema import FINAL_STATES, PromptState, UploadResult
from gpu_common.tls import verify_for

__all__ = [
    "FINAL_STATES",
    "ComfyUIController",
    "Connection",
    "OutputFile",
    "PromptEvent",
    "PromptRecord",
    "PromptState",
]

log = logging.getLogger(__name__)

Connection = Literal["websocket", "polling", "down"]

# ComfyUI's messages about one prompt, sent to the client id that queued it: one of them about
# a prompt this process does not know makes it adopt the prompt (a previous process queued it).
ADOPTING_MESSAGES = frozenset(
    {"execution_start", "execution_cached", "executing", "progress", "executed",
     "execution_success", "execution_error", "execution_interrupted"}
)  # fmt: skip
# Finished records kept for get()/records(); ComfyUI itself keeps 10000 history entries.
MAX_FINISHED_RECORDS = 10_000
# Preview frames can be whole images; text frames stay small.
WEBSOCKET_MAX_FRAME_BYTES = 64 * 1024**2


class ComfyUIController:
    """Drives one ComfyUI server's queue for the controller and tracks every prompt it submits.

    `start()` runs the background follower (websocket + polling); without it, `submit`, `cancel`
    and the other calls still work but records only advance through `cancel`'s own checks.
    Records are announced through `on_event` (called on the event loop; it must not block).
    """

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str,
        request_timeout_s: float = 10.0,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        poll_interval_s: float = 1.0,
        quiet_after_s: float = 5.0,
        on_event: Callable[[PromptEvent], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        monotonic: Callable[[], float] = clock.monotonic_s,
        rng: random.Random | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._client_id = client_id
        self._request_timeout_s = request_timeout_s
        # Reconnect jitter draws from `rng`; a seeded one replays a run exactly.
        self._backoff = Backoff(reconnect_initial_s, reconnect_max_s, rng=rng)
        self._poll_interval_s = poll_interval_s
        self._quiet_after_s = quiet_after_s
        self.on_event = on_event
        self._monotonic = monotonic
        self._http = httpx.AsyncClient(
            base_url=self._base_url,
            verify=verify_for(self._base_url),
            timeout=httpx.Timeout(request_timeout_s),
            transport=transport,
            trust_env=False,
            limits=httpx.Limits(keepalive_expiry=clock.http_keepalive_expiry_s()),
        )
        # Every prompt, in submission order. Ids in `_submitting` are being posted: messages
        # already apply to them, but they are not public and not reconciled until POST answers.
        self._tracks: dict[str, PromptTrack] = {}
        self._submitting: dict[str, asyncio.Future[PromptRecord]] = {}
        # Ids whose POST /prompt got no answer: ComfyUI may or may not have queued them.
        self._unconfirmed: set[str] = set()
        self._history_wanted: set[str] = set()
        # Where each prompt's SaveImage nodes write their first files: found on disk, they
        # prove a prompt ComfyUI no longer knows ran to its end.
        self._probes: dict[str, tuple[SavedImageProbe, ...]] = {}
        self._reconcile_due = False
        self._wake = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._ws_open = False
        self._last_message_t: float | None = None
        self._ws_opened_t: float | None = None
        self._last_poll_ok: bool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following ComfyUI (websocket with polling fallback) in the background."""
        if self._started:
            return
        self._started = True
        self._tasks = [
            asyncio.create_task(self._follow_websocket(), name="comfyui-websocket"),
            asyncio.create_task(self._poll_loop(), name="comfyui-poll"),
        ]

    async def stop(self) -> None:
        """Stop the follower and close every connection. The records stay readable."""
        self._started = False
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()

    # -- state ------------------------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        """How prompts are being followed: the websocket, polling, or not at all."""
        if not self._started:
            return "down"
        if self._ws_open and not self._quiet_with_work():
            return "websocket"
        if self._last_poll_ok:
            return "polling"
        return "websocket" if self._ws_open else "down"

    @property
    def last_message_age_s(self) -> float | None:
        """Seconds since the websocket last delivered a frame; None if it never did."""
        if self._last_message_t is None:
            return None
        return max(0.0, self._monotonic() - self._last_message_t)

    def get(self, prompt_id: str) -> PromptRecord | None:
        """The record of a submitted prompt, or None if this adapter never submitted it."""
        if prompt_id in self._submitting:
            return None
        track = self._tracks.get(prompt_id)
        return track.record if track else None

    async def find(self, prompt_id: str) -> PromptRecord | None:
        """The record of `prompt_id`, also for one this adapter does not track (it restarted
        since the submit): that one is looked up in ComfyUI's queue and history and followed
        from then on. None only when neither knows it; raises `ComfyUIUnavailable` when
        ComfyUI cannot say."""
        inflight = self._submitting.get(prompt_id)
        if inflight is not None:
            return await asyncio.shield(inflight)
        track = self._tracks.get(prompt_id)
        if track is not None:
            return track.record
        known = await self._known_to_comfyui(prompt_id)
        if known is None:
            return None
        if prompt_id in self._submitting or prompt_id in self._tracks:
            # A submit of the same id came while we looked; it settles the record.
            return await self.find(prompt_id)
        self._tracks[prompt_id] = known
        return self._publish_submitted(prompt_id)

    def records(self) -> list[PromptRecord]:
        """Every submitted prompt's record, oldest first."""
        return [t.record for pid, t in self._tracks.items() if pid not in self._submitting]

    # -- commands ---------------------------------------------------------------------------

    async def submit(self, workflow: dict[str, Any], prompt_id: str | None = None) -> PromptRecord:
        """Queue `workflow` under `prompt_id` (a new uuid4 when None) and return its record.

        Idempotent per id: an id already tracked returns its record without posting again; a
        caller's id this process does not track (the agent restarted, or a POST got no answer)
        is first looked up in `/queue` and `/history/{id}`, so a retry never runs a prompt twice.
        Raises `WorkflowRejected` (400, with ComfyUI's `node_errors`) or `ComfyUIUnavailable`.
        """
        pid = prompt_id if prompt_id is not None else str(uuid.uuid4())
        inflight = self._submitting.get(pid)
        if inflight is not None:
            return await asyncio.shield(inflight)
        track = self._tracks.get(pid)
        if track is not None:
            return track.record
        workflow, probes = tag_outputs(workflow, pid)
        if probes:
            self._probes[pid] = probes
        future: asyncio.Future[PromptRecord] = asyncio.get_running_loop().create_future()
        self._submitting[pid] = future
        self._tracks[pid] = new_track(pid, submitted_at=clock.utc_now(), nodes_total=len(workflow))
        try:
            record = await self._submit(pid, workflow, look_first=prompt_id is not None)
        except BaseException as exc:
            self._tracks.pop(pid, None)
            if not future.done():
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                    future.exception()  # nobody else may be waiting: mark it retrieved
                else:
                    future.cancel()
            raise
        finally:
            self._submitting.pop(pid, None)
        future.set_result(record)
        return record

    async def _submit(
        self, pid: str, workflow: dict[str, Any], *, look_first: bool
    ) -> PromptRecord:
        if look_first or pid in self._unconfirmed:
            try:
                known = await self._adopt_if_known(pid)
            except ComfyUIUnavailable as exc:
                raise ComfyUIUnavailable(str(exc), prompt_id=pid) from exc
            if known:
                self._unconfirmed.discard(pid)
                return self._publish_submitted(pid)
        body = {"prompt": workflow, "client_id": self._client_id, "prompt_id": pid}
        # Unconfirmed until ComfyUI answers or provably never saw it, so that a timeout or a
        # cancelled call leaves the retry to look before posting again.
        self._unconfirmed.add(pid)
        try:
            response = await self._request("POST", "/prompt", json=body, submitting=pid)
        except ComfyUIUnavailable as exc:
            if exc.prompt_id is None:
                self._unconfirmed.discard(pid)
            raise
        self._unconfirmed.discard(pid)
        if response.status_code == 400:
            payload = _json_or_none(response)
            error = payload.get("error") if isinstance(payload, dict) else None
            node_errors = payload.get("node_errors") if isinstance(payload, dict) else None
            if not isinstance(error, dict):
                error = {"type": "rejected", "message": str(error or response.text or "rejected")}
            raise WorkflowRejected(error, node_errors if isinstance(node_errors, dict) else {})
        self._raise_for_status(response, "POST /prompt")
        payload = _json_or_none(response)
        if isinstance(payload, dict) and payload.get("node_errors"):
            log.warning(
                "prompt %s queued with some outputs invalid: %s", pid, payload["node_errors"]
            )
        return self._publish_submitted(pid)

    async def _adopt_if_known(self, pid: str) -> bool:
        """After an unanswered POST: does ComfyUI know `pid`? Settle it if so."""
        known = await self._known_to_comfyui(pid)
        if known is None:
            return False
        self._tracks[pid] = known
        return True

    async def _known_to_comfyui(self, pid: str) -> PromptTrack | None:
        """The prompt's track (a new one if none is kept) settled against ComfyUI's queue and
        history, or against the pictures it saved (when it restarted since); None when ComfyUI
        shows nothing of the prompt."""
        running, pending = await self._queue_ids()
        history = await self._history_entry(pid)
        saved: tuple[OutputFile, ...] = ()
        if pid not in running and pid not in pending and history is None:
            saved = await self._saved_outputs(pid)
            if not saved:
                return None
            log.info("prompt %s: ComfyUI no longer knows it, but its pictures are saved", pid)
        # Read after the lookups: messages may have moved the kept track meanwhile.
        track = self._tracks.get(pid) or new_track(pid, submitted_at=clock.utc_now(), nodes_total=0)
        transition = reconcile(
            track,
            running_ids=running,
            pending_ids=pending,
            history=history,
            now=clock.utc_now(),
            saved=saved,
        )
        return transition.track

    def _publish_submitted(self, pid: str) -> PromptRecord:
        """Make a just-queued prompt public and announce what has already happened to it."""
        self._submitting.pop(pid, None)
        record = self._tracks[pid].record
        log.info("prompt %s submitted", pid)
        self._emit("submitted", record)
        if record.state != "pending":
            self._emit("finished" if record.final else "started", record)
            if record.final:
                self._after_final(record)
        self._wake.set()
        return record

    async def cancel(self, prompt_id: str) -> PromptRecord:
        """Stop a prompt: delete it from the pending queue, or interrupt it while it runs.

        A pending prompt is `cancelled` on return (unless it started meanwhile); a running one
        becomes `cancelled` when ComfyUI reports the interrupt. A final record is returned as is.
        """
        track = self._tracks.get(prompt_id)
        if track is None or prompt_id in self._submitting:
            raise PromptNotFound(prompt_id)
        if track.record.final:
            return track.record
        self._tracks[prompt_id] = request_cancel(track)
        if track.record.state == "pending":
            response = await self._request("POST", "/queue", json={"delete": [prompt_id]})
            self._raise_for_status(response, "POST /queue")
            # It may have started, or finished, before the delete: look before calling it
            # cancelled, queue first and history second (see `reconcile`).
            running, pending = await self._queue_ids()
            history = None if prompt_id in running else await self._history_entry(prompt_id)
            self._apply(
                prompt_id,
                partial(
                    _reconcile_now, running=running, pending=pending, history=history, saved=()
                ),
            )
            if prompt_id not in running:
                return self._tracks[prompt_id].record
        await self._interrupt(prompt_id)
        return self._tracks[prompt_id].record

    async def _interrupt(self, prompt_id: str) -> None:
        response = await self._request("POST", "/interrupt", json={"prompt_id": prompt_id})
        self._raise_for_status(response, "POST /interrupt")
        log.info("interrupt sent for prompt %s", prompt_id)
        self._wake.set()

    async def fetch_output(self, prompt_id: str, index: int) -> tuple[bytes, str, str]:
        """The `index`-th output file of a prompt: (bytes, filename, content type)."""
        track = self._tracks.get(prompt_id)
        if track is None or prompt_id in self._submitting:
            raise PromptNotFound(prompt_id)
        outputs = track.record.outputs
        if not 0 <= index < len(outputs):
            raise OutputNotFound(
                f"prompt {prompt_id} has {len(outputs)} output file(s); no index {index}"
            )
        item = outputs[index]
        params = {"filename": item.filename, "subfolder": item.subfolder, "type": item.type}
        response = await self._request("GET", "/view", params=params)
        if response.status_code in (400, 403, 404):
            raise OutputNotFound(
                f"ComfyUI has no file {item.filename!r} (answered {response.status_code})"
            )
        self._raise_for_status(response, "GET /view")
        content_type = response.headers.get("content-type", "application/octet-stream")
        return response.content, item.filename, content_type.split(";")[0].strip()

    async def upload(
        self,
        data: bytes,
        filename: str,
        *,
        mask_of: Mapping[str, str] | None = None,
        folder_type: str = "input",
        subfolder: str = "",
        overwrite: bool = False,
        content_type: str = "application/octet-stream",
    ) -> UploadResult:
        """Upload a picture with ComfyUI's semantics: `/upload/image`, or `/upload/mask` onto
        the original `mask_of` names (`{filename, subfolder, type}`). Without `overwrite` a
        name taken by another file becomes `name (1).ext`; the answer says what was chosen.

        Raises `UploadRejected` for ComfyUI's 400 or 403, `ComfyUIUnavailable` otherwise."""
        path = "/upload/image" if mask_of is None else "/upload/mask"
        fields = {
            "type": folder_type,
            "subfolder": subfolder,
            "overwrite": "true" if overwrite else "",
        }
        if mask_of is not None:
            fields["original_ref"] = json.dumps(dict(mask_of))
        files = {"image": (filename, data, content_type)}
        response = await self._request("POST", path, data=fields, files=files)
        if response.status_code in (400, 403):
            raise UploadRejected(
                f"ComfyUI refused the upload of {filename!r} to {path} "
                f"({response.status_code}{': ' + response.text[:200] if response.text else ''})"
            )
        self._raise_for_status(response, f"POST {path}")
        try:
            return UploadResult.model_validate_json(response.content)
        except ValueError as exc:
            raise ComfyUIError(f"POST {path} answered {response.text[:200]!r}") from exc

    async def free(self, *, unload_models: bool = True, free_memory: bool = True) -> None:
        """Ask ComfyUI to unload models and/or empty its caches.

        ComfyUI applies this after the running prompt, not at once; watch the GPU to see it.
        """
        body = {"unload_models": unload_models, "free_memory": free_memory}
        response = await self._request("POST", "/free", json=body)
        self._raise_for_status(response, "POST /free")

    async def queue_counts(self) -> tuple[int, int]:
        """(running, pending) prompts in ComfyUI's queue, from GET /queue."""
        running, pending = await self._queue_ids()
        return len(running), len(pending)

    async def system_stats(self) -> dict[str, Any]:
        """GET /system_stats as ComfyUI sends it (bytes for every memory figure)."""
        response = await self._request("GET", "/system_stats")
        self._raise_for_status(response, "GET /system_stats")
        payload = _json_or_none(response)
        if not isinstance(payload, dict):
            raise ComfyUIError("GET /system_stats did not answer a JSON object")
        return payload

    # -- HTTP chokepoint --------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        submitting: str | None = None,
        data: Mapping[str, str] | None = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
    ) -> httpx.Response:
        """Send one request; every transport failure and 5xx becomes `ComfyUIUnavailable`.

        `submitting` names a prompt being posted: a failure after the request may have reached
        ComfyUI carries that id, so the caller knows the prompt's fate is unknown.
        """
        what = f"{method} {path}"
        if self._http.is_closed:
            raise ComfyUIUnavailable(f"the ComfyUI adapter is stopped; cannot {what}")
        try:
            response = await self._http.request(
                method, path, json=json, params=params, data=data, files=files
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing was sent: the outcome is certain.
            raise ComfyUIUnavailable(
                f"cannot reach ComfyUI at {self._base_url} for {what}: {exc!r}"
            ) from exc
        except httpx.TimeoutException as exc:
            raise ComfyUIUnavailable(
                f"ComfyUI did not answer {what} within {self._request_timeout_s} s",
                prompt_id=submitting,
            ) from exc
        except httpx.HTTPError as exc:
            raise ComfyUIUnavailable(
                f"{what} to ComfyUI failed: {exc!r}", prompt_id=submitting
            ) from exc
        if response.status_code >= 500:
            raise ComfyUIUnavailable(
                f"ComfyUI answered {what} with {response.status_code}: {response.text[:200]}",
                prompt_id=submitting,
            )
        return response

    @staticmethod
    def _raise_for_status(response: httpx.Response, what: str) -> None:
        if response.status_code >= 400:
            raise ComfyUIError(
                f"ComfyUI answered {what} with {response.status_code}: {response.text[:200]}"
            )

    async def _saved_outputs(self, pid: str) -> tuple[OutputFile, ...]:
        """The files the prompt's SaveImage nodes wrote, found on disk through `/view`; empty
        unless every node wrote its first file (or the prompt has no probes)."""
        found: list[OutputFile] = []
        for probe in self._probes.get(pid, ()):
            counter = 1
            while counter <= MAX_FILES_PER_NODE:
                params = {"filename": probe.filename(counter), "subfolder": probe.subfolder,
                          "type": "output"}  # fmt: skip
                # HEAD: whether the file is there, without reading a picture of megabytes.
                response = await self._request("HEAD", "/view", params=params)
                if response.status_code != 200:
                    break
                found.append(OutputFile(probe.node_id, params["filename"], probe.subfolder,
                                        "output"))  # fmt: skip
                counter += 1
            if counter == 1:
                return ()
        return tuple(found)

    async def _queue_ids(self) -> tuple[frozenset[str], frozenset[str]]:
        response = await self._request("GET", "/queue")
        self._raise_for_status(response, "GET /queue")
        payload = _json_or_none(response)
        if not isinstance(payload, dict):
            raise ComfyUIError("GET /queue did not answer a JSON object")
        return queue_prompt_ids(payload)

    async def _history_entry(self, prompt_id: str) -> Mapping[str, Any] | None:
        response = await self._request("GET", f"/history/{prompt_id}")
        self._raise_for_status(response, "GET /history")
        payload = _json_or_none(response)
        entry = payload.get(prompt_id) if isinstance(payload, dict) else None
        return entry if isinstance(entry, dict) else None

    # -- applying transitions ---------------------------------------------------------------

    def _apply(
        self, prompt_id: str, step: Callable[[PromptTrack], Transition]
    ) -> Transition | None:
        """Run one pure step on a tracked prompt, store the result and announce its event."""
        track = self._tracks.get(prompt_id)
        if track is None:
            return None
        transition = step(track)
        self._tracks[prompt_id] = transition.track
        if transition.want_history:
            self._history_wanted.add(prompt_id)
            self._wake.set()
        if transition.event is None or prompt_id in self._submitting:
            return transition
        record = transition.track.record
        if transition.event == "started":
            log.info("prompt %s started", prompt_id)
        elif transition.event == "finished":
            log.info("prompt %s %s: %s", prompt_id, record.state, record.reason)
        self._emit(transition.event, record)
        if transition.event == "finished":
            self._after_final(record)
        return transition

    def _emit(self, kind: EventKind, record: PromptRecord) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(PromptEvent(kind, record))
        except Exception:
            # A listener's bug must not stop the follower.
            log.exception("on_event listener failed for prompt %s", record.prompt_id)

    def _after_final(self, record: PromptRecord) -> None:
        if record.state != "succeeded":
            # Only a success can still gain outputs from history.
            self._history_wanted.discard(record.prompt_id)
        finished = [pid for pid, t in self._tracks.items() if t.record.final]
        for pid in finished[: max(0, len(finished) - MAX_FINISHED_RECORDS)]:
            del self._tracks[pid]
            self._probes.pop(pid, None)

    def _outstanding(self) -> list[str]:
        return [
            pid
            for pid, t in self._tracks.items()
            if not t.record.final and pid not in self._submitting
        ]

    def _quiet_with_work(self) -> bool:
        heard = self._last_message_t if self._last_message_t is not None else self._ws_opened_t
        if heard is None:
            return False
        quiet = self._monotonic() - heard >= self._quiet_after_s
        return quiet and bool(self._outstanding())

    # -- websocket follower -----------------------------------------------------------------

    def _websocket_url(self) -> str:
        parts = urlsplit(self._base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = f"{parts.path.rstrip('/')}/ws"
        return urlunsplit((scheme, parts.netloc, path, f"clientId={self._client_id}", ""))

    async def _follow_websocket(self) -> None:
        backoff = self._backoff
        backoff.reset()
        while self._started:
            try:
                async with websockets.connect(
                    self._websocket_url(),
                    open_timeout=self._request_timeout_s,
                    close_timeout=self._request_timeout_s,
                    ping_interval=20.0,
                    ping_timeout=self._request_timeout_s,
                    max_size=WEBSOCKET_MAX_FRAME_BYTES,
                    proxy=None,
                ) as ws:
                    self._on_connected(ws)
                    backoff.reset()
                    async for frame in ws:
                        self._last_message_t = self._monotonic()
                        if isinstance(frame, str):
                            self._on_text(frame)
                        # Binary frames are previews; they only prove the socket is alive.
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                # Say it once per outage, not at every reconnect attempt.
                log.log(
                    logging.DEBUG if backoff.retries else logging.INFO,
                    "ComfyUI websocket: %r",
                    exc,
                )
            finally:
                self._on_disconnected()
            await backoff.sleep()

    def _on_connected(self, ws: ClientConnection) -> None:
        log.info("ComfyUI websocket connected as %s", self._client_id)
        self._ws = ws
        self._ws_open = True
        self._ws_opened_t = self._monotonic()
        # Whatever happened while we were away, find out now.
        self._reconcile_due = True
        self._wake.set()

    def _on_disconnected(self) -> None:
        was_open, self._ws_open, self._ws = self._ws_open, False, None
        if was_open:
            log.info("ComfyUI websocket closed; polling until it reconnects")
            # Until a poll succeeds, nothing says ComfyUI is reachable at all.
            self._last_poll_ok = None
            self._reconcile_due = True
            self._wake.set()

    def _on_text(self, text: str) -> None:
        message = parse_message(text)
        if message is None:
            return
        prompt_id = message.prompt_id
        if prompt_id is None:
            return
        if prompt_id not in self._tracks:
            if message.type not in ADOPTING_MESSAGES or prompt_id in self._unconfirmed:
                # (An unconfirmed one is ours already: its retry looks it up before posting.)
                return
            # Our client id, but not a prompt this process submitted: one a previous agent
            # process queued before it restarted. Follow it, so that its outcome is known here
            # and a retry of the same id finds it instead of running it again (ComfyUI forgets
            # it at its next restart).
            log.info("prompt %s adopted: queued before this agent started", prompt_id)
            self._tracks[prompt_id] = new_track(
                prompt_id, submitted_at=clock.utc_now(), nodes_total=0
            )
        self._apply(prompt_id, lambda t: apply_message(t, message, clock.utc_now()))

    def _recycle_deaf_socket(self) -> None:
        """The socket stayed open but missed an outcome polling found: open a fresh one."""
        ws = self._ws
        if ws is not None:
            log.warning("ComfyUI websocket missed an outcome; reconnecting it")
            task = asyncio.create_task(ws.close(), name="comfyui-websocket-recycle")
            self._tasks.append(task)

    # -- polling and reconciliation ---------------------------------------------------------

    async def _poll_loop(self) -> None:
        while self._started:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that lands as the event is set, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            self._tasks = [t for t in self._tasks if not t.done()]
            try:
                await self._poll_once()
            except ComfyUIError as exc:
                if self._last_poll_ok is not False:
                    log.warning("polling ComfyUI failed: %s", exc)
                self._last_poll_ok = False
                # Try again at the next interval; the wanted set and due flag stay set.

    async def _poll_once(self) -> None:
        quiet_socket = self._ws_open and self._quiet_with_work()
        full = self._reconcile_due or not self._ws_open or quiet_socket
        wanted = set(self._history_wanted)
        if not full and not wanted:
            return
        if full:
            self._reconcile_due = False
            try:
                settled = await self._reconcile_outstanding()
            except ComfyUIError:
                self._reconcile_due = True
                raise
            if settled and quiet_socket and self._ws_open:
                self._recycle_deaf_socket()
        for pid in wanted:
            entry = await self._history_entry(pid)
            self._history_wanted.discard(pid)
            if entry is not None:
                self._apply(pid, partial(_settle_from_history, entry=entry))
            elif pid in self._tracks and not self._tracks[pid].record.final:
                # A done marker but no history yet: let the full reconcile settle it.
                self._reconcile_due = True
        self._last_poll_ok = True

    async def _reconcile_outstanding(self) -> bool:
        """Reconcile every outstanding prompt; True if that settled one's outcome.

        The ids are taken *before* reading the queue, so a prompt submitted meanwhile is not
        judged by a queue read older than its POST.
        """
        candidates = self._outstanding()
        running, pending = await self._queue_ids()
        self._last_poll_ok = True
        settled = False
        for pid in candidates:
            saved: tuple[OutputFile, ...] = ()
            if pid in running or pid in pending:
                history = None
            else:
                # Read after the queue: a prompt that finished between the reads is found here.
                history = await self._history_entry(pid)
                if history is None:
                    # Gone from ComfyUI (it restarted): finished before that if its pictures
                    # are on disk, else lost.
                    saved = await self._saved_outputs(pid)
            transition = self._apply(
                pid,
                partial(
                    _reconcile_now, running=running, pending=pending, history=history, saved=saved
                ),
            )
            settled = settled or (transition is not None and transition.event == "finished")
        return settled


def _reconcile_now(
    track: PromptTrack,
    *,
    running: frozenset[str],
    pending: frozenset[str],
    history: Mapping[str, Any] | None,
    saved: tuple[OutputFile, ...],
) -> Transition:
    return reconcile(
        track,
        running_ids=running,
        pending_ids=pending,
        history=history,
        now=clock.utc_now(),
        saved=saved,
    )


def _settle_from_history(track: PromptTrack, *, entry: Mapping[str, Any]) -> Transition:
    return apply_history(track, entry, clock.utc_now())


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
