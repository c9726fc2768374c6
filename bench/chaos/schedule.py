"""The chaos day's fault schedule: pure, seeded, the same list for the same seed everywhere.

`fault_schedule(seed, span_s, faults_per_day)` spreads `faults_per_day * span_s / 86400`
faults (rounded) over the span. Every kind in `KINDS` gets its share by weight (at least one
each), at uniformly drawn times; faults of one kind never overlap (a fault is cut short where the
next of its kind begins), faults of different kinds do, as on a real desktop. Each fault says what
happens (`params`) and for how long (`duration_s`, 0 for a single blow such as a dropped
websocket); the chaos stack carries it out and reverts it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

DAY_S: Final = 86_400.0
# A fault cut short by the next of its kind still lasts this long (simulated seconds).
MIN_DURATION_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class KindSpec:
    """How often a kind of fault comes (relative `weight`) and how long it lasts (seconds)."""

    weight: float
    min_s: float
    max_s: float
    what: str


# Every kind of fault the simulated desktop and the stack can produce, with how it is carried
# out. Durations are simulated seconds; spans of a few seconds to a quarter hour, as a desktop
# shows them (a game session is longer, but then it is just memory that stays taken).
KINDS: Final[Mapping[str, KindSpec]] = MappingProxyType(
    {
        "comfyui_restart": KindSpec(6, 1, 30, "ComfyUI restarted, mid-prompt when one runs"),
        "comfyui_ws_drop": KindSpec(6, 0, 0, "ComfyUI's websockets dropped"),
        "comfyui_ws_silent": KindSpec(6, 5, 120, "ComfyUI's websocket silent"),
        "ollama_slow": KindSpec(6, 10, 180, "Ollama slow to answer"),
        "ollama_hang": KindSpec(6, 5, 60, "Ollama hung"),
        "ollama_midstream": KindSpec(6, 10, 180, "Ollama failing mid-stream"),
        "ollama_down": KindSpec(6, 5, 120, "Ollama down"),
        "ollama_restart": KindSpec(6, 1, 10, "Ollama restarted, its models gone from memory"),
        "nvml_failing": KindSpec(6, 5, 60, "NVML readings failing"),
        "nvml_stale": KindSpec(6, 5, 60, "NVML readings stale"),
        "foreign_vram": KindSpec(10, 30, 900, "a foreign process taking VRAM"),
        "agent_restart": KindSpec(6, 1, 20, "the agent restarted"),
        "controller_crash": KindSpec(6, 1, 30, "the controller crashed and reopened"),
        "link_cut": KindSpec(6, 5, 120, "the controller-agent link cut"),
        "link_delay": KindSpec(6, 30, 300, "the controller-agent link delayed"),
        "store_full": KindSpec(6, 10, 120, "the controller's disk full"),
    }
)

# Who takes VRAM on the desktop besides our stack: (name, command line, smallest, largest bytes).
FOREIGN_PROCESSES: Final = (
    ("steam_game", ("/home/studio/.steam/steamapps/common/game/game.x86_64",), 2 << 30, 4 << 30),
    ("chrome", ("/opt/google/chrome/chrome", "--type=gpu-process"), 300 << 20, 1 << 30),
    ("python3", ("python3", "train_lora.py"), 1 << 30, 6 << 30),
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: what (`kind`, with `params`), when (`at_s` from the start) and for how long."""

    at_s: float
    kind: str
    duration_s: float
    params: Mapping[str, float | str] = field(default_factory=dict)

    @property
    def end_s(self) -> float:
        """When the fault is reverted (its start, for a single blow)."""
        return self.at_s + self.duration_s


def fault_count(span_s: float, faults_per_day: float) -> int:
    """How many faults a span of `span_s` seconds gets at `faults_per_day`."""
    return max(len(KINDS), math.ceil(faults_per_day * span_s / DAY_S))


def fault_schedule(seed: int, span_s: float, faults_per_day: float) -> list[Fault]:
    """The faults of one run, in time order; the same arguments give the same list."""
    rng = random.Random(f"chaos-{seed}")
    total = fault_count(span_s, faults_per_day)
    weight_sum = sum(spec.weight for spec in KINDS.values())
    counts = {kind: max(1, int(total * spec.weight / weight_sum)) for kind, spec in KINDS.items()}
    # Hand out what rounding left over, heaviest kinds first, so the total is exact.
    by_weight = sorted(KINDS, key=lambda kind: (-KINDS[kind].weight, kind))
    index = 0
    while sum(counts.values()) < total:
        counts[by_weight[index % len(by_weight)]] += 1
        index += 1
    faults: list[Fault] = []
    for kind in sorted(KINDS):
        spec = KINDS[kind]
        starts = sorted(round(rng.uniform(0.0, span_s), 3) for _ in range(counts[kind]))
        for position, start in enumerate(starts):
            duration = round(rng.uniform(spec.min_s, spec.max_s), 3)
            if spec.max_s and position + 1 < len(starts):
                room = starts[position + 1] - start - MIN_DURATION_S
                duration = round(max(0.0, min(duration, room)), 3)
            faults.append(Fault(start, kind, duration, _params(kind, rng)))
    faults.sort(key=lambda f: (f.at_s, f.kind))
    return faults


def _params(kind: str, rng: random.Random) -> dict[str, float | str]:
    """What a fault of `kind` does beyond its duration, drawn from `rng`."""
    if kind == "ollama_slow":
        return {"delay_s": round(rng.uniform(0.5, 20.0), 3)}
    if kind == "ollama_midstream":
        return {"after_tokens": rng.randint(1, 40)}
    if kind == "link_delay":
        return {"delay_s": round(rng.uniform(0.05, 2.0), 3)}
    if kind == "foreign_vram":
        name, _, low, high = rng.choice(FOREIGN_PROCESSES)
        return {"process": name, "vram_bytes": rng.randint(low, high)}
    return {}


def kind_counts(faults: list[Fault]) -> dict[str, int]:
    """How many faults of each kind, every kind listed."""
    counts = dict.fromkeys(sorted(KINDS), 0)
    for fault in faults:
        counts[fault.kind] += 1
    return counts
