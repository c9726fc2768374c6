"""What the controller has learned, and the model catalogue built from it (imperative shell).

Speeds come from Ollama's own counters on every finished generation, LLM footprints from the
agent's load results, image peaks from ComfyUI's measured memory during each job. All of it is
kept in the job store, so it survives restarts; the pure functions that update it live in
`controller.domain.footprints`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from controller.domain.catalog import DEFAULT_NUM_CTX, profile
from controller.domain.footprints import (
    ImageKey,
    Speed,
    SpeedSample,
    estimate_image_peak,
    learn_image_peak,
    learn_llm_footprint,
    learn_load,
    learn_speed,
    llm_key,
)
from controller.domain.types import ModelProfile
from controller.store import AsyncJobStore
from gpu_common.schema import AvailableModelInfo

log = logging.getLogger(__name__)

SPEEDS = "speeds"
LLM_FOOTPRINTS = "llm_footprints"
IMAGE_PEAKS = "image_peaks"


class Knowledge:
    """Learned speeds and footprints, persisted through the job store."""

    def __init__(self, store: AsyncJobStore, quality: Mapping[str, float]) -> None:
        self._store = store
        self._quality = dict(quality)
        self.speeds: dict[str, Speed] = {}
        self.llm_footprints: dict[str, int] = {}
        self.image_peaks: dict[str, int] = {}

    async def load(self) -> None:
        raw_speeds = await self._store.get_learned(SPEEDS)
        self.speeds = {name: Speed(**value) for name, value in raw_speeds.items()}
        self.llm_footprints = {
            k: int(v) for k, v in (await self._store.get_learned(LLM_FOOTPRINTS)).items()
        }
        self.image_peaks = {
            k: int(v) for k, v in (await self._store.get_learned(IMAGE_PEAKS)).items()
        }
        log.info(
            "learned so far: %d model speeds, %d LLM footprints, %d image footprints",
            len(self.speeds),
            len(self.llm_footprints),
            len(self.image_peaks),
        )

    # -- the catalogue --------------------------------------------------------------------

    def catalog(self, available: Iterable[AvailableModelInfo]) -> dict[str, ModelProfile]:
        """One profile per model any agent offers."""
        models: dict[str, ModelProfile] = {}
        for model in available:
            if model.name in models:
                continue
            models[model.name] = profile(
                model.name,
                file_bytes=model.size_bytes,
                family=model.family,
                parameter_size=model.parameter_size,
                quality_override=self._quality.get(model.name),
                speed=self.speeds.get(model.name, Speed()),
                footprints=self.llm_footprints,
                num_ctx=DEFAULT_NUM_CTX,
            )
        return models

    def image_peak(self, key: ImageKey, hint_bytes: int | None) -> tuple[int, str]:
        return estimate_image_peak(key, self.image_peaks, hint_bytes)

    # -- learning -------------------------------------------------------------------------

    async def record_generation(
        self, model: str, final: Mapping[str, Any], *, was_loaded: bool
    ) -> None:
        """Fold Ollama's final line of one generation into the model's speeds."""
        sample = SpeedSample(
            prompt_eval_count=int(final.get("prompt_eval_count") or 0),
            prompt_eval_duration_ns=int(final.get("prompt_eval_duration") or 0),
            eval_count=int(final.get("eval_count") or 0),
            eval_duration_ns=int(final.get("eval_duration") or 0),
            load_duration_ns=int(final.get("load_duration") or 0),
        )
        self.speeds[model] = learn_speed(
            self.speeds.get(model, Speed()), sample, was_loaded=was_loaded
        )
        await self._save_speed(model)

    async def _save_speed(self, model: str) -> None:
        speed = self.speeds[model]
        value = {
            "decode_tokens_per_s": speed.decode_tokens_per_s,
            "prompt_tokens_per_s": speed.prompt_tokens_per_s,
            "load_s": speed.load_s,
            "samples": speed.samples,
        }
        await self._store.put_learned(SPEEDS, model, value)

    async def record_load(
        self, model: str, num_ctx: int, vram_bytes: int, size_bytes: int, load_s: float
    ) -> None:
        self.llm_footprints = learn_llm_footprint(
            self.llm_footprints, model, num_ctx, vram_bytes, size_bytes
        )
        key = llm_key(model, num_ctx)
        await self._store.put_learned(LLM_FOOTPRINTS, key, self.llm_footprints[key])
        self.speeds[model] = learn_load(self.speeds.get(model, Speed()), load_s)
        await self._save_speed(model)

    async def record_image_peak(self, key: ImageKey, peak_bytes: int) -> None:
        self.image_peaks = learn_image_peak(self.image_peaks, key, peak_bytes)
        await self._store.put_learned(IMAGE_PEAKS, key.encode(), self.image_peaks[key.encode()])
