"""A studio's busy hour, as a fixed seeded workload (shared by the demo and the benchmarks).

LLM requests arrive as a Poisson stream, half at the "fast" intent and half at "quality"; image
jobs come in bursts (a designer queues several SDXL variations at once) with SD1.5 drafts in
between. Times are simulated seconds from the start.
"""

from __future__ import annotations

import dataclasses
import random
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
    """A chat request arriving at `at_s` that asks for `output_tokens` tokens of answer."""

    at_s: float
    intent: Intent
    prompt: str
    output_tokens: int


@dataclass(frozen=True, slots=True)
class ImageArrival:
    """A text-to-image job arriving at `at_s`: `steps` sampler steps on an SDXL or SD1.5 model."""

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


DAY_S = 24 * 3600.0
HOUR_S = 3600.0


def studio_day(*, seed: int = 7, busy_hours: int = 3) -> list[Arrival]:
    """A studio's whole day from midnight, in time order; the same seed gives the same day.

    The night is quiet (a few scripted requests), the working day from 09:00 to 18:00 has a
    steady trickle of LLM requests and image drafts, and `busy_hours` of those hours are busy
    hours (`busy_hour`'s mix in ten minutes); the evening tails off.
    """
    rng = random.Random(seed)
    arrivals: list[Arrival] = []

    def trickle(start_s: float, end_s: float, llm: int, sd15: int) -> None:
        for _ in range(llm):
            intent: Intent = "auto:fast" if rng.random() < 0.5 else "auto:quality"
            arrivals.append(
                LlmArrival(
                    at_s=round(rng.uniform(start_s, end_s), 3),
                    intent=intent,
                    prompt=rng.choice(PROMPTS),
                    output_tokens=rng.randint(60, 360),
                )
            )
        for _ in range(sd15):
            arrivals.append(
                ImageArrival(
                    round(rng.uniform(start_s, end_s), 3), "sd15", 20, rng.randrange(10**6)
                )
            )

    trickle(0.0, 8 * HOUR_S, llm=6, sd15=2)  # night: a cron job or two
    trickle(9 * HOUR_S, 18 * HOUR_S, llm=90, sd15=20)  # the working day's steady trickle
    trickle(18 * HOUR_S, DAY_S, llm=12, sd15=3)  # evening
    starts = rng.sample(range(9, 18), busy_hours)
    for hour in sorted(starts):
        offset_s = hour * HOUR_S + rng.uniform(0, HOUR_S - 600.0)
        burst = busy_hour(
            seed=rng.randrange(10**6),
            span_s=600.0,
            llm_requests=30,
            sdxl_bursts=2,
            sdxl_per_burst=4,
            sd15_jobs=4,
        )
        arrivals.extend(dataclasses.replace(a, at_s=round(a.at_s + offset_s, 3)) for a in burst)
    return sorted(arrivals, key=lambda a: (a.at_s, type(a).__name__))


def fleet_hour(*, seed: int = 7, desktops: int = 4) -> list[Arrival]:
    """`busy_hour` made `desktops` times heavier, for a fleet of that many desktops."""
    return busy_hour(
        seed=seed,
        llm_requests=60 * desktops,
        sdxl_bursts=5 * desktops,
        sd15_jobs=10 * desktops,
    )
