"""The chaos day's fault schedule: seeded, exact in count, every kind, none overlapping itself."""

from __future__ import annotations

import itertools
from collections import defaultdict

from bench.chaos.schedule import DAY_S, KINDS, fault_count, fault_schedule, kind_counts


def test_same_seed_same_schedule_and_another_seed_another() -> None:
    assert fault_schedule(3, 3600.0, 2000.0) == fault_schedule(3, 3600.0, 2000.0)
    assert fault_schedule(3, 3600.0, 2000.0) != fault_schedule(4, 3600.0, 2000.0)


def test_a_day_gets_its_rate_exactly_with_every_kind() -> None:
    faults = fault_schedule(0, DAY_S, 1200.0)
    assert len(faults) == fault_count(DAY_S, 1200.0) == 1200
    counts = kind_counts(faults)
    assert set(counts) == set(KINDS)
    assert all(count >= 1 for count in counts.values())


def test_a_short_span_still_gets_every_kind() -> None:
    faults = fault_schedule(1, 600.0, 10.0)
    assert {f.kind for f in faults} == set(KINDS)


def test_faults_are_in_time_order_and_one_kind_never_overlaps_itself() -> None:
    faults = fault_schedule(7, 4 * 3600.0, 6000.0)
    assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)
    by_kind = defaultdict(list)
    for fault in faults:
        assert fault.duration_s >= 0
        assert 0 <= fault.at_s <= 4 * 3600.0
        by_kind[fault.kind].append(fault)
    for kind, spells in by_kind.items():
        for earlier, later in itertools.pairwise(spells):
            assert earlier.end_s <= later.at_s, (kind, earlier, later)
        if KINDS[kind].max_s == 0:
            assert all(f.duration_s == 0 for f in spells)


def test_parameters_are_drawn_for_the_kinds_that_need_them() -> None:
    for fault in fault_schedule(2, DAY_S, 1200.0):
        if fault.kind in ("ollama_slow", "link_delay"):
            assert float(fault.params["delay_s"]) > 0
        elif fault.kind == "ollama_midstream":
            assert int(fault.params["after_tokens"]) >= 1
        elif fault.kind == "foreign_vram":
            assert int(fault.params["vram_bytes"]) > 0
            assert fault.params["process"] in {"steam_game", "chrome", "python3"}
        else:
            assert fault.params == {}
