"""A studio's busy hour, as a fixed seeded workload (shared by the demo and the benchmarks).

LLM requests arrive as a Poisson stream, half at the "fast" intent and half at "quality"; image
jobs come in bursts (a designer queues several SDXL variations at once) with SD1.5 drafts in
between. Times are simulated seconds from the start.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Intent = Literal["auto:fast", "auto:quality"]

PROMPTS = (
    "Write a product description for a walnut desk lamp.",
    "Summarise this client brief in three bullet points: a rebrand for a bakery chain.",
    "Suggest five names for a podcast about architecture.",
    "Draft a polite reply declining a meeting next Tuesday.",
    "Explain the difference between kerning and tracking to a junior designer.",
    "Give me a shot list for a 30 second coffee commercial.",
)


@dataclass(frozen=True, slots=True)
class LlmArrival:
    at_s: float
    intent: Intent
    prompt: str
    output_tokens: int


@dataclass(frozen=True, slots=True)
class ImageArrival:
    at_s: float
    family: Literal["sdxl", "sd15"]
    steps: int
    seed: int


Arrival = LlmArrival | ImageArrival


def busy_hour(
    *,
    seed: int = 7,
    span_s: float = 600.0,
    llm_requests: int = 60,
    sdxl_bursts: int = 5,
    sdxl_per_burst: int = 4,
    sd15_jobs: int = 10,
) -> list[Arrival]:
    """The arrivals, in time order. The same seed gives the same workload."""
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    for i in range(llm_requests):
        intent: Intent = "auto:fast" if i % 2 == 0 else "auto:quality"
        arrivals.append(
            LlmArrival(
                at_s=round(rng.uniform(0, span_s), 3),
                intent=intent,
                prompt=rng.choice(PROMPTS),
                output_tokens=rng.randint(60, 240)
                if intent == "auto:fast"
                else rng.randint(120, 360),
            )
        )
    for burst in range(sdxl_bursts):
        start = rng.uniform(0, span_s * 0.9)
        for j in range(sdxl_per_burst):
            arrivals.append(
                ImageArrival(
                    round(start + j * rng.uniform(0.5, 3.0), 3), "sdxl", 20, burst * 100 + j
                )
            )
    for k in range(sd15_jobs):
        arrivals.append(ImageArrival(round(rng.uniform(0, span_s), 3), "sd15", 20, 1000 + k))
    return sorted(arrivals, key=lambda a: (a.at_s, type(a).__name__))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
