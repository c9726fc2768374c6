"""The chaos day's invariant checker: pure, fed observations with `now`, returning violations."""

from __future__ import annotations

from bench.chaos.invariants import InvariantChecker, JobEnd, reason_causes, recovery_summary


def checker() -> InvariantChecker:
    return InvariantChecker(recovery_bound_s=60.0, llm_timeout_s=900.0)


def test_a_job_that_ends_twice_differently_is_a_violation() -> None:
    check = checker()
    check.job_accepted(0.0, "a")
    assert check.job_seen(5.0, "a", "running", "running on desk") == []
    assert check.job_seen(9.0, "a", "succeeded", "finished on desk with 1 output(s)") == []
    assert check.job_seen(12.0, "a", "succeeded", "finished on desk with 1 output(s)") == []
    [violation] = check.job_seen(15.0, "a", "failed", "ComfyUI on desk restarted and lost it")
    assert violation.invariant == "exactly once"
    assert violation.at_s == 15.0


def test_a_failure_needs_a_fault_that_explains_it() -> None:
    check = checker()
    check.job_accepted(0.0, "a")
    [violation] = check.job_seen(30.0, "a", "failed", "ComfyUI on desk restarted and lost it")
    assert violation.invariant == "true reason"

    check.fault_began(40.0, 1, "comfyui_restart")
    check.job_accepted(41.0, "b")
    check.fault_ended(50.0, 1)
    reason = "gave up after 3 attempts: ComfyUI on desk restarted and lost it"
    assert check.job_seen(90.0, "b", "failed", reason) == []
    check.job_accepted(100.0, "c")
    [unknown] = check.job_seen(110.0, "c", "failed", "something nobody said")
    assert "unexplained" in unknown.detail


def test_an_out_of_memory_failure_is_true_only_after_an_out_of_memory() -> None:
    assert reason_causes("ran out of GPU memory on desk; its footprint grows") == frozenset({"oom"})
    check = checker()
    check.job_accepted(0.0, "a")
    check.out_of_memory(10.0, 1, foreign=True)
    assert (
        check.job_seen(
            20.0, "a", "failed", "gave up after 3 attempts: ran out of GPU memory on desk"
        )
        == []
    )
    assert check.oom == {"self": 0, "foreign": 1}


def test_lost_and_doubled_jobs_at_the_end() -> None:
    check = checker()
    for job in ("ok", "lost", "twice", "rerun"):
        check.job_accepted(0.0, job)
    stored = {
        "ok": JobEnd("succeeded", "finished", ("p1",)),
        "lost": JobEnd("running", "running on desk", ("p2",)),
        "twice": JobEnd("succeeded", "finished", ("p3", "p4")),
        "rerun": JobEnd("succeeded", "finished", ("p5",)),
    }
    runs = {"p1": 1, "p2": 1, "p3": 1, "p4": 1, "p5": 2}
    successes = {"p1": 1, "p3": 1, "p4": 1, "p5": 1}
    found = check.jobs_at_end(100.0, stored, runs, successes)
    assert check.lost == 1
    assert check.doubled == 2
    assert {v.invariant for v in found} == {"exactly once", "nothing twice"}


def test_a_job_missing_from_the_store_is_lost() -> None:
    check = checker()
    check.job_accepted(0.0, "gone")
    [violation] = check.jobs_at_end(10.0, {}, {}, {})
    assert check.lost == 1
    assert "missing from the store" in violation.detail


def test_llm_outcomes() -> None:
    check = checker()
    assert check.llm_answered(1.0, 0, "ok", "done") == []
    assert check.llm_answered(2.0, 1, "error", "503: no healthy agent") == []
    [hung] = check.llm_answered(3.0, 2, "hung", "ReadTimeout")
    [unclear] = check.llm_answered(4.0, 3, "unclear", "status 500 with an empty body")
    assert (hung.invariant, unclear.invariant) == ("llm answered", "llm answered")
    assert check.hung == 1
    assert check.llm_requests == 4


def test_self_inflicted_memory_failures_are_violations_and_foreign_ones_are_counted_apart() -> None:
    check = checker()
    assert check.spilled(1.0, 2, foreign=True) == []
    [violation] = check.spilled(2.0, 1, foreign=False)
    assert violation.invariant == "no self-inflicted spill"
    assert check.spill == {"self": 1, "foreign": 2}


def test_recovery_is_timed_from_the_fault_end_and_bounded_in_fault_free_seconds() -> None:
    check = checker()
    check.fault_began(0.0, 1, "ollama_down")
    check.fault_ended(10.0, 1)
    assert check.tick(11.0, 1.0, serving=False) == []
    assert check.tick(14.0, 3.0, serving=True) == []
    assert check.recovery_s == {"ollama_down": [4.0]}

    check.fault_began(20.0, 2, "link_cut")
    check.fault_ended(30.0, 2)
    check.fault_began(30.0, 3, "nvml_failing")
    # Another fault is active: the bound does not run.
    assert check.tick(200.0, 170.0, serving=False) == []
    check.fault_ended(200.0, 3)
    assert check.tick(250.0, 50.0, serving=False) == []
    late = check.tick(261.0, 11.0, serving=False)
    assert [v.invariant for v in late] == ["recovery", "recovery"]
    assert "link_cut" in late[0].detail
    assert "nvml_failing" in late[1].detail

    check.fault_began(270.0, 4, "ollama_hang")
    check.fault_ended(280.0, 4)
    [never] = check.unrecovered(300.0)
    assert "ollama_hang" in never.detail


def test_a_foreign_process_does_not_stop_the_recovery_clock() -> None:
    check = checker()
    check.fault_began(0.0, 1, "agent_restart")
    check.fault_ended(5.0, 1)
    check.fault_began(5.0, 2, "foreign_vram")
    [violation] = check.tick(70.0, 65.0, serving=False)
    assert "agent_restart" in violation.detail


def test_leaks_beyond_the_limit() -> None:
    check = checker()
    assert check.bounded(1.0, "tasks", 40, 60, 40) == []
    [leak] = check.bounded(1.0, "open files", 30, 90, 40)
    assert leak.invariant == "bounded"


def test_figures_have_exactly_the_reported_keys() -> None:
    check = checker()
    check.fault_began(0.0, 1, "link_cut")
    check.fault_ended(3.0, 1)
    check.tick(5.0, 2.0, serving=True)
    figures = check.figures({"link_cut": 1})
    assert set(figures) == {
        "faults", "image_jobs", "llm_requests", "lost", "doubled", "hung",
        "self_inflicted_oom", "self_inflicted_spill", "recovery_s", "violations",
    }  # fmt: skip
    assert figures["recovery_s"] == {"link_cut": {"p50": 2.0, "p95": 2.0, "worst": 2.0}}


def test_recovery_summary_orders_its_quantiles() -> None:
    summary = recovery_summary({"x": [5.0, 1.0, 3.0, 2.0, 4.0]})
    assert summary["x"]["p50"] == 3.0
    assert summary["x"]["p50"] <= summary["x"]["p95"] <= summary["x"]["worst"] == 5.0
