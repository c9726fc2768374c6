"""The chaos day's invariants: a pure checker fed observations, returning violations as values.

Nothing here does I/O or reads a clock: the chaos run observes the stack and the simulated
desktop, and hands each observation over with the simulated time `now`. The checker keeps what
it needs to judge the promises:

- every accepted image job ends exactly once (a final state never changes), and a failed job's
  reason names a cause that the faults of its lifetime explain; at the end none is left unended;
- no job has two successful ComfyUI prompts, and no prompt runs twice to its end (a run that a
  ComfyUI restart cut short is lost work, and running it again is the recovery);
- every LLM request gets an answer or a clear error, none hangs past its timeout;
- out-of-memory failures and CPU spills are counted, those a foreign allocation explains apart;
- after each fault the system serves again, with the ledger agreeing with the GPU, within
  `recovery_bound_s` seconds in which no other fault is active;
- tasks and open files stay bounded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from gpu_common.stats import percentile

FINAL_STATES: Final = frozenset({"succeeded", "failed", "cancelled"})
# Kinds of fault that leave serving alone: a recovery's clock keeps counting while only these
# are active (a foreign process's memory is the controller's to plan around, not a breakdown).
HARMLESS_WHILE_ACTIVE: Final = frozenset({"foreign_vram"})
# A fault that began this long before a job was accepted may still explain how it ended.
CAUSE_GRACE_S: Final = 120.0
# What can make a dispatch fail or a prompt get lost: any fault on the way to ComfyUI.
_PATH_FAULTS: Final = frozenset(
    {
        "agent_restart",
        "comfyui_restart",
        "comfyui_ws_drop",
        "comfyui_ws_silent",
        "controller_crash",
        "link_cut",
        "link_delay",
        "nvml_failing",
        "nvml_stale",
        "store_full",
    }
)
# Reason texts of failed jobs and the faults (or "oom" events) that make them true.
REASON_CAUSES: Final[tuple[tuple[re.Pattern[str], frozenset[str]], ...]] = (
    (re.compile(r"ComfyUI on \S+ restarted and lost it"), frozenset({"comfyui_restart"})),
    (re.compile(r"ran out of GPU memory"), frozenset({"oom"})),
    (re.compile(r"dispatch to \S+ (failed|refused|never arrived)"), _PATH_FAULTS),
)


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken promise: which invariant, when (simulated seconds from the start), and what."""

    invariant: str
    at_s: float
    detail: str


@dataclass(frozen=True, slots=True)
class JobEnd:
    """How the store holds an accepted job at the end: state, reason and attempt prompt ids."""

    state: str
    reason: str
    prompt_ids: tuple[str, ...]


@dataclass
class _Job:
    accepted_at: float
    final: tuple[str, str] | None = None
    ended_at: float | None = None


@dataclass
class _Window:
    kind: str
    start_s: float
    end_s: float = math.inf  # while active


@dataclass
class _Recovery:
    kind: str
    since_s: float
    clear_s: float = 0.0


def reason_causes(reason: str) -> frozenset[str] | None:
    """The fault kinds (or "oom") that can make a failed job's `reason` true; None when the
    reason is not one a fault explains."""
    reason = reason.split(": ", 1)[1] if reason.startswith("gave up after") else reason
    for pattern, causes in REASON_CAUSES:
        if pattern.search(reason):
            return causes
    return None


@dataclass
class InvariantChecker:
    """Judges the observations of one chaos run; each method returns the violations it found
    (also kept in `violations`)."""

    recovery_bound_s: float
    llm_timeout_s: float
    violations: list[Violation] = field(default_factory=list)
    image_jobs: int = 0
    llm_requests: int = 0
    hung: int = 0
    oom: dict[str, int] = field(default_factory=lambda: {"self": 0, "foreign": 0})
    spill: dict[str, int] = field(default_factory=lambda: {"self": 0, "foreign": 0})
    recovery_s: dict[str, list[float]] = field(default_factory=dict)
    lost: int = 0
    doubled: int = 0
    _jobs: dict[str, _Job] = field(default_factory=dict)
    # When each fault was active.
    _windows: list[_Window] = field(default_factory=list)
    _active: dict[int, int] = field(default_factory=dict)
    _oom_at: list[float] = field(default_factory=list)
    _recoveries: list[_Recovery] = field(default_factory=list)

    def _found(self, invariant: str, now: float, detail: str) -> list[Violation]:
        violation = Violation(invariant, round(now, 3), detail)
        self.violations.append(violation)
        return [violation]

    # -- faults and recovery ----------------------------------------------------------------

    def fault_began(self, now: float, fault_id: int, kind: str) -> None:
        """Fault `fault_id` of `kind` was applied at `now`."""
        self._active[fault_id] = len(self._windows)
        self._windows.append(_Window(kind, now))

    def fault_ended(self, now: float, fault_id: int) -> None:
        """Fault `fault_id` was reverted (or, a single blow, struck) at `now`: from here the
        system must serve again within the bound."""
        window = self._windows[self._active.pop(fault_id)]
        window.end_s = now
        self._recoveries.append(_Recovery(window.kind, now))

    def active_kinds(self) -> set[str]:
        """The kinds of fault active now."""
        return {self._windows[i].kind for i in self._active.values()}

    def tick(self, now: float, elapsed_s: float, serving: bool) -> list[Violation]:
        """`elapsed_s` seconds passed up to `now`; `serving` says whether the system serves
        (healthy agent, both services reachable, ledger agreeing with the GPU)."""
        if serving:
            for recovery in self._recoveries:
                self.recovery_s.setdefault(recovery.kind, []).append(now - recovery.since_s)
            self._recoveries.clear()
            return []
        if self.active_kinds() - HARMLESS_WHILE_ACTIVE:
            return []
        found: list[Violation] = []
        for recovery in self._recoveries:
            recovery.clear_s += elapsed_s
            if recovery.clear_s > self.recovery_bound_s:
                found += self._found(
                    "recovery",
                    now,
                    f"not serving again {now - recovery.since_s:.1f} s after {recovery.kind} "
                    f"ended ({recovery.clear_s:.1f} s of them with no other fault)",
                )
        self._recoveries = [r for r in self._recoveries if r.clear_s <= self.recovery_bound_s]
        return found

    def unrecovered(self, now: float) -> list[Violation]:
        """At the end: faults after which the system never served again."""
        found: list[Violation] = []
        for recovery in self._recoveries:
            found += self._found(
                "recovery", now, f"never serving again after {recovery.kind} at {recovery.since_s}"
            )
        self._recoveries.clear()
        return found

    def _kinds_between(self, start: float, end: float) -> set[str]:
        return {w.kind for w in self._windows if w.start_s <= end and w.end_s >= start}

    # -- image jobs -------------------------------------------------------------------------

    def job_accepted(self, now: float, job_id: str) -> list[Violation]:
        """The controller answered 202 for `job_id` (a replay of a key may repeat it)."""
        if job_id not in self._jobs:
            self._jobs[job_id] = _Job(now)
            self.image_jobs += 1
        return []

    def refused(self, now: float, detail: str) -> list[Violation]:
        """A valid image job was refused for good (not a retryable outage)."""
        return self._found("accepted", now, detail)

    def job_seen(self, now: float, job_id: str, state: str, reason: str) -> list[Violation]:
        """The controller showed `job_id` in `state` with `reason`."""
        job = self._jobs.get(job_id)
        if job is None:
            return self._found("exactly once", now, f"job {job_id} seen but never accepted")
        if job.final is not None:
            if (state, reason) != job.final:
                return self._found(
                    "exactly once",
                    now,
                    f"job {job_id} ended as {job.final} and later showed {state}: {reason}",
                )
            return []
        if state not in FINAL_STATES:
            return []
        job.final, job.ended_at = (state, reason), now
        if state == "cancelled":
            return self._found("true reason", now, f"job {job_id} cancelled, nobody asked")
        if state == "failed":
            return self._check_reason(now, job_id, job, reason)
        return []

    def _check_reason(self, now: float, job_id: str, job: _Job, reason: str) -> list[Violation]:
        causes = reason_causes(reason)
        if causes is None:
            return self._found("true reason", now, f"job {job_id} failed: {reason!r} unexplained")
        start = job.accepted_at - CAUSE_GRACE_S
        seen = self._kinds_between(start, now)
        if any(start <= at <= now for at in self._oom_at):
            seen.add("oom")
        if not causes & seen:
            return self._found(
                "true reason",
                now,
                f"job {job_id} failed: {reason!r}, but none of {sorted(causes)} happened "
                f"between {start:.1f} and {now:.1f}",
            )
        return []

    def jobs_at_end(
        self,
        now: float,
        stored: Mapping[str, JobEnd],
        prompt_ends: Mapping[str, int],
        prompt_successes: Mapping[str, int],
    ) -> list[Violation]:
        """At the end: every accepted job is in the store, ended, as it was last seen; no job
        has two successful prompts and no prompt ran to its end twice (`prompt_ends`: how
        often each prompt id's execution ended)."""
        found: list[Violation] = []
        for job_id in sorted(self._jobs):
            end = stored.get(job_id)
            if end is None or end.state not in FINAL_STATES:
                self.lost += 1
                state = "missing from the store" if end is None else f"still {end.state}"
                found += self._found("exactly once", now, f"job {job_id} lost: {state}")
                continue
            found += self.job_seen(now, job_id, end.state, end.reason)
            successes = sum(prompt_successes.get(p, 0) for p in end.prompt_ids)
            reruns = [p for p in end.prompt_ids if prompt_ends.get(p, 0) > 1]
            if successes > 1 or reruns:
                self.doubled += 1
                found += self._found(
                    "nothing twice",
                    now,
                    f"job {job_id}: {successes} successful prompts, prompts run twice: {reruns}",
                )
            if end.state == "succeeded" and successes == 0:
                found += self._found(
                    "exactly once", now, f"job {job_id} succeeded without a successful prompt"
                )
        return found

    # -- LLM requests -----------------------------------------------------------------------

    def llm_answered(self, now: float, index: int, outcome: str, detail: str) -> list[Violation]:
        """LLM request `index` ended: "ok", "error" (a clear error), "hung" (no answer within
        `llm_timeout_s`) or "unclear" (an error that says nothing, or an answer cut off)."""
        self.llm_requests += 1
        if outcome == "hung":
            self.hung += 1
            return self._found(
                "llm answered", now, f"request {index} hung past {self.llm_timeout_s} s: {detail}"
            )
        if outcome == "unclear":
            return self._found("llm answered", now, f"request {index}: {detail}")
        return []

    # -- memory -----------------------------------------------------------------------------

    def out_of_memory(self, now: float, count: int, *, foreign: bool) -> list[Violation]:
        """`count` ComfyUI prompts failed out of memory; `foreign` when a foreign process's
        allocation explains it."""
        self.oom["foreign" if foreign else "self"] += count
        self._oom_at.append(now)
        if foreign:
            return []
        return self._found("no self-inflicted OOM", now, f"{count} ComfyUI OOM, no foreign cause")

    def spilled(self, now: float, count: int, *, foreign: bool) -> list[Violation]:
        """`count` generations ran partly on the CPU; `foreign` as for `out_of_memory`."""
        self.spill["foreign" if foreign else "self"] += count
        if foreign:
            return []
        return self._found("no self-inflicted spill", now, f"{count} spilled, no foreign cause")

    def bounded(
        self, now: float, what: str, before: int, after: int, limit: int
    ) -> list[Violation]:
        """`what` (tasks, open files) went from `before` to `after`; more than `limit` growth
        is a leak."""
        if after - before > limit:
            return self._found("bounded", now, f"{what}: {before} at the start, {after} at the end")
        return []

    # -- figures ----------------------------------------------------------------------------

    def figures(self, faults: Mapping[str, int]) -> dict[str, object]:
        """The run's figures under the names of `out/chaos.json`."""
        return {
            "faults": dict(faults),
            "image_jobs": self.image_jobs,
            "llm_requests": self.llm_requests,
            "lost": self.lost,
            "doubled": self.doubled,
            "hung": self.hung,
            "self_inflicted_oom": self.oom["self"],
            "self_inflicted_spill": self.spill["self"],
            "recovery_s": recovery_summary(self.recovery_s),
            "violations": [vars_of(v) for v in self.violations],
        }


def vars_of(violation: Violation) -> dict[str, object]:
    """A violation as plain JSON-able values."""
    return {"invariant": violation.invariant, "at_s": violation.at_s, "detail": violation.detail}


def recovery_summary(samples: Mapping[str, Iterable[float]]) -> dict[str, dict[str, float]]:
    """Per kind, the p50, p95 and worst of its recovery times, in simulated seconds."""
    summary: dict[str, dict[str, float]] = {}
    for kind in sorted(samples):
        values = sorted(samples[kind])
        if values:
            summary[kind] = {
                "p50": round(percentile(values, 50), 3),
                "p95": round(percentile(values, 95), 3),
                "worst": round(values[-1], 3),
            }
    return summary


def merge_samples(runs: Collection[Mapping[str, list[float]]]) -> dict[str, list[float]]:
    """Recovery samples of several runs, kind by kind."""
    merged: dict[str, list[float]] = {}
    for run in runs:
        for kind, values in run.items():
            merged.setdefault(kind, []).extend(values)
    return merged
