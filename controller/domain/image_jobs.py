"""What one event does to one image job (pure core).

`transition(job, event, now, max_attempts=...)` takes the job as the scheduler holds it
(`ImageJobState`), one event (an admission, the agent's news of the job's prompt, a failed
dispatch, a cancel request, ...) and returns a `Transition`: the job's state after it, the
actions that carry it out, in order, and a human-readable reason. Writing to the store is one of
those actions (`Store`, with the fields to write); the shell (`controller.images`) performs
them all, and does nothing the transition does not say.

A job that ended (or that the scheduler no longer tracks, `job=None`) ignores every event: news
can arrive twice, late, or for an attempt that has been settled already.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

JobStatus = Literal["held", "dispatched", "running", "succeeded", "failed", "cancelled"]
PromptStatus = Literal[
    "pending", "running", "succeeded", "failed", "interrupted", "cancelled", "unknown"
]
FINAL_JOB_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# A prompt in one of these states never changes state again.
FINAL_PROMPT_STATES: frozenset[str] = frozenset(
    {"succeeded", "failed", "interrupted", "cancelled", "unknown"}
)
# After an out-of-memory failure the job's footprint is raised by this factor before a retry.
OOM_GROWTH = 1.25
CANCELLED_BY_CALLER = "cancelled by the caller"


@dataclass(frozen=True, slots=True)
class ImageJobState:
    """One unfinished image job as the transitions see it.

    `prompt_id` is ComfyUI's id for the current attempt; `cancelling` says the caller asked to
    cancel a job that is out at an agent, which has not confirmed it yet; `inputs` is how many
    input pictures it carries (uploaded to the agent's ComfyUI before each submission).
    """

    job_id: str
    state: JobStatus
    reason: str
    attempts: int = 0
    agent: str | None = None
    family: str | None = None
    prompt_id: str = ""
    cancelling: bool = False
    inputs: int = 0

    @property
    def final(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.state in FINAL_JOB_STATES


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admitted:
    """The admission policy placed the held job on `agent`."""

    agent: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """No healthy agent's whole budget could ever hold the job."""

    reason: str


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """The caller asked to cancel the job."""


@dataclass(frozen=True, slots=True)
class RoomMade:
    """The dispatch to `agent` made its room (unloads, a ComfyUI free): the job may go."""

    agent: str


@dataclass(frozen=True, slots=True)
class SubmitAnswered:
    """The agent took the job's workflow; its prompt is in `state`."""

    state: PromptStatus


@dataclass(frozen=True, slots=True)
class DispatchFailed:
    """Sending the job to its agent failed for a reason a retry may cure."""

    why: str


@dataclass(frozen=True, slots=True)
class WorkflowRejected:
    """`agent`'s ComfyUI refused the job's workflow: retrying cannot help."""

    agent: str
    message: str


@dataclass(frozen=True, slots=True)
class InputsUnusable:
    """The job's input pictures cannot reach ComfyUI: the controller's copy is gone or damaged,
    or the agent's ComfyUI refused the upload. Retrying cannot help."""

    message: str


@dataclass(frozen=True, slots=True)
class AgentGone:
    """The job's agent is no longer configured."""


@dataclass(frozen=True, slots=True)
class PromptNews:
    """What `agent` said of prompt `prompt_id`: its state, and for a finished prompt how it
    ended (`outputs` files; `oom` when ComfyUI ran out of GPU memory; `peak_vram_bytes`,
    ComfyUI's memory at its highest in readings the agent took while it ran)."""

    agent: str
    prompt_id: str
    state: PromptStatus
    reason: str | None = None
    error: str | None = None
    outputs: int = 0
    oom: bool = False
    peak_vram_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Requeue:
    """The current attempt is lost (`why`): hold the job again, or give up on it."""

    why: str


Event = (
    Admitted
    | Unplaceable
    | CancelRequested
    | RoomMade
    | SubmitAnswered
    | DispatchFailed
    | WorkflowRejected
    | InputsUnusable
    | AgentGone
    | PromptNews
    | Requeue
)


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobUpdate:
    """Fields to write to the job's stored record; None leaves a field as it is.

    `clear_agent` empties the agent; `with_result` also writes the outputs the shell fetched,
    the job's last progress and the memory peak it measured.
    """

    state: JobStatus | None = None
    reason: str | None = None
    agent: str | None = None
    clear_agent: bool = False
    attempts: int | None = None
    error: str | None = None
    with_result: bool = False


@dataclass(frozen=True, slots=True)
class Store:
    """Write `update` to the job store."""

    update: JobUpdate


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Start the dispatch: make the admission's room on the agent, then submit."""


@dataclass(frozen=True, slots=True)
class GiveBack:
    """Drop what the admission promised in the ledger: the job will not be dispatched."""


@dataclass(frozen=True, slots=True)
class UploadInputs:
    """Upload the job's input pictures to the agent's ComfyUI and name them in the workflow
    that `Submit` sends (ComfyUI may rename a picture on upload)."""


@dataclass(frozen=True, slots=True)
class Submit:
    """Send the workflow to the agent under the attempt's prompt id."""


@dataclass(frozen=True, slots=True)
class CancelAtAgent:
    """Ask the agent to cancel the attempt's prompt; its answer is news of the prompt."""


@dataclass(frozen=True, slots=True)
class FetchOutputs:
    """Fetch the prompt's `count` output files; if that fails, stop here (the next reconcile
    pass asks again)."""

    count: int


@dataclass(frozen=True, slots=True)
class ReleaseRun:
    """End the job's run in `agent`'s ledger book, noting `family` as the checkpoint ComfyUI
    keeps loaded (None: unknown); `learn_peak_bytes` is a peak measured during the run to learn
    for the job's kind of image (None: nothing to learn)."""

    agent: str
    family: str | None = None
    learn_peak_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class GrowFootprint:
    """Learn a larger footprint for the job's kind of image (`oom_footprint`)."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Feed `Requeue(why)` for the job as it is once the actions before this one are done."""

    why: str


@dataclass(frozen=True, slots=True)
class Forget:
    """The job ended: drop what the scheduler keeps of it in memory."""


Action = (
    Store
    | Dispatch
    | GiveBack
    | UploadInputs
    | Submit
    | CancelAtAgent
    | FetchOutputs
    | ReleaseRun
    | GrowFootprint
    | Retry
    | Forget
)


@dataclass(frozen=True, slots=True)
class Transition:
    """The job's `state` after an event, the `actions` that carry it out (in order) and why.

    `news_at` is set when the event was news from the job's agent (the shell notes when, and the
    progress it carried); `cancelling` is the job's cancel flag after the event.
    """

    state: JobStatus | None
    reason: str
    actions: tuple[Action, ...] = ()
    news_at: float | None = None
    cancelling: bool = False

    @property
    def update(self) -> JobUpdate | None:
        """The fields the transition writes to the store, if it writes any."""
        return next((a.update for a in self.actions if isinstance(a, Store)), None)

    @property
    def ignored(self) -> bool:
        """Whether the event changes nothing at all."""
        return not self.actions and self.news_at is None


def oom_footprint(peak_bytes: int, budgets_bytes: Sequence[int]) -> int:
    """The footprint to learn after a job whose expected peak was `peak_bytes` ran out of
    memory: `OOM_GROWTH` times larger, but never more than the largest budget, or the job could
    never run again."""
    grown = int(peak_bytes * OOM_GROWTH)
    return min(grown, max(budgets_bytes)) if budgets_bytes else grown


def transition(
    job: ImageJobState | None, event: Event, now: float, *, max_attempts: int
) -> Transition:
    """What `event` does to `job` at `now` (seconds on the scheduler's clock).

    `job` is None when the scheduler no longer tracks the job: it ended. `max_attempts` is how
    many dispatches a job gets before a lost attempt fails it.
    """
    if job is None or job.final:
        return _ended(job, event)
    if isinstance(event, Admitted):
        return _admitted(job, event, now)
    if isinstance(event, Unplaceable):
        if job.state != "held":
            return _stay(job, f"no longer held ({job.state}): nothing to fail")
        return _end(job, "failed", event.reason, error=event.reason)
    if isinstance(event, CancelRequested):
        return _cancel_requested(job)
    if isinstance(event, RoomMade):
        if job.cancelling:
            return _end(job, "cancelled", CANCELLED_BY_CALLER, before=(ReleaseRun(event.agent),))
        if job.inputs:
            return _stay(
                job,
                f"room made on {event.agent}: uploading {job.inputs} input picture(s), "
                "then submitting",
                (UploadInputs(), Submit()),
            )
        return _stay(job, f"room made on {event.agent}: submitting", (Submit(),))
    if isinstance(event, SubmitAnswered):
        if job.cancelling and event.state not in FINAL_PROMPT_STATES:
            return _stay(
                job, "a cancel arrived while the submission was on its way", (CancelAtAgent(),)
            )
        return _stay(job, f"submitted; the prompt is {event.state}")
    if isinstance(event, DispatchFailed):
        return _stay(job, event.why, (Retry(event.why),))
    if isinstance(event, WorkflowRejected):
        return _end(
            job,
            "failed",
            "ComfyUI rejected the workflow",
            error=event.message,
            before=(ReleaseRun(event.agent),),
        )
    if isinstance(event, InputsUnusable):
        # Its room was promised on its agent at admission: give that back.
        release = (ReleaseRun(job.agent),) if job.agent is not None else ()
        why = "its input pictures cannot reach ComfyUI"
        return _end(job, "failed", why, error=event.message, before=release)
    if isinstance(event, AgentGone):
        return _end(job, "failed", f"agent {job.agent} is no longer configured")
    if isinstance(event, PromptNews):
        return _prompt_news(job, event, now)
    return _requeue(job, event, max_attempts)


def _stay(job: ImageJobState, reason: str, actions: tuple[Action, ...] = ()) -> Transition:
    return Transition(job.state, reason, actions, cancelling=job.cancelling)


def _end(
    job: ImageJobState,
    state: JobStatus,
    reason: str,
    *,
    error: str | None = None,
    before: tuple[Action, ...] = (),
    news_at: float | None = None,
    with_result: bool = False,
) -> Transition:
    """The job ends in `state`: `before`, then the write, then the job is forgotten."""
    update = JobUpdate(state=state, reason=reason, error=error, with_result=with_result)
    return Transition(
        state, reason, (*before, Store(update), Forget()), news_at, cancelling=job.cancelling
    )


def _ended(job: ImageJobState | None, event: Event) -> Transition:
    what = type(event).__name__
    if isinstance(event, Admitted):
        # Cancelled between the admission and its write: the promise it made is given back.
        return Transition(
            None, f"{what}: the job has ended; its admission is given back", (GiveBack(),)
        )
    if job is None:
        return Transition(None, f"{what}: the job has ended; nothing to do")
    return Transition(job.state, f"{what}: the job already {job.state}; nothing to do")


def _admitted(job: ImageJobState, event: Admitted, now: float) -> Transition:
    if job.state != "held":
        return _stay(job, f"no longer held ({job.state}): admission given back", (GiveBack(),))
    update = JobUpdate(
        state="dispatched", agent=event.agent, reason=event.reason, attempts=job.attempts + 1
    )
    return Transition(
        "dispatched", event.reason, (Store(update), Dispatch()), now, cancelling=job.cancelling
    )


def _cancel_requested(job: ImageJobState) -> Transition:
    if job.state == "held":
        return _end(job, "cancelled", CANCELLED_BY_CALLER)
    return Transition(
        job.state, f"asking {job.agent} to cancel it", (CancelAtAgent(),), cancelling=True
    )


def _prompt_news(job: ImageJobState, news: PromptNews, now: float) -> Transition:
    if news.agent != job.agent:
        return _stay(job, f"news from {news.agent}, but the job is on {job.agent}: ignored")
    if news.prompt_id != job.prompt_id:
        return _stay(job, "news of an earlier attempt, which has been settled already")
    agent = news.agent

    def stay(reason: str, actions: tuple[Action, ...] = ()) -> Transition:
        return Transition(job.state, reason, actions, now, cancelling=job.cancelling)

    if news.state == "pending":
        queued = f"queued in ComfyUI on {agent}"
        if job.reason == queued:
            return stay(queued)
        return stay(queued, (Store(JobUpdate(reason=queued)),))
    if news.state == "running":
        running = f"running on {agent}"
        if job.state != "dispatched":
            return stay(running)
        update = JobUpdate(state="running", reason=running)
        return Transition("running", running, (Store(update),), now, cancelling=job.cancelling)
    if news.state == "succeeded":
        return _end(
            job,
            "succeeded",
            f"finished on {agent} with {news.outputs} output(s)",
            before=(
                FetchOutputs(news.outputs),
                ReleaseRun(agent, job.family, learn_peak_bytes=news.peak_vram_bytes),
            ),
            news_at=now,
            with_result=True,
        )
    if news.state == "failed":
        if news.oom:
            # Our footprint was too small: learn a larger one, then try again.
            why = f"ran out of GPU memory on {agent}"
            return stay(f"{why}; its footprint grows", (GrowFootprint(), Retry(why)))
        return _end(
            job,
            "failed",
            f"failed on {agent}: {news.reason or 'error'}",
            error=news.error or news.reason,
            before=(ReleaseRun(agent, job.family),),
            news_at=now,
        )
    if news.state in ("interrupted", "cancelled"):
        why = CANCELLED_BY_CALLER if job.cancelling else "interrupted on the desktop"
        return _end(job, "cancelled", why, before=(ReleaseRun(agent, job.family),), news_at=now)
    why = f"ComfyUI on {agent} restarted and lost it"
    return stay(why, (Retry(why),))


def _requeue(job: ImageJobState, event: Requeue, max_attempts: int) -> Transition:
    release: tuple[Action, ...] = (ReleaseRun(job.agent),) if job.agent is not None else ()
    if job.attempts >= max_attempts:
        why = f"gave up after {job.attempts} attempts: {event.why}"
        return _end(job, "failed", why, error=event.why, before=release)
    why = f"{event.why}; will retry"
    update = JobUpdate(state="held", clear_agent=True, reason=why)
    return Transition("held", why, (*release, Store(update)), cancelling=job.cancelling)
