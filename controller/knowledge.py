"""What the controller has learned, and the model catalogue built from it (imperative shell).

Speeds come from Ollama's own counters on every finished generation, LLM footprints from the
agent's load results, image peaks from ComfyUI's measured memory during each job. All of it is
kept in the job store, so it survives restarts; the pure functions that update it live in
`controller.domain.footprints`. Speeds change with every generation, so they are written in
batches off the request's path (`AsyncJobStore.put_learned_soon`): a crash may lose the last few
seconds of them. Footprints and image peaks change rarely and are committed as they are learned.

Every request is planned against the catalogue, so it is kept between requests and rebuilt only
when a snapshot or a learned value it depends on changed, and then only for the models whose
inputs changed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
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
        # Bumped on every change of what the catalogue is built from (speeds, LLM footprints).
        self.version = 0
        # The latest catalogue and what it was built from: this version and those snapshots.
        self._catalog: dict[str, ModelProfile] = {}
        self._catalog_version = -1
        self._catalog_snapshots: tuple[object, ...] | None = None
        # Each model's latest profile with the agent's figures it was built from, so a rebuild
        # reuses it while they hold; `_stale` names the models learned about since.
        self._profiles: dict[str, tuple[tuple[object, ...], ModelProfile]] = {}
        self._stale: set[str] = set()

    async def load(self) -> None:
        """Read what earlier runs learned (speeds, LLM footprints, image peaks) from the store."""
        raw_speeds = await self._store.get_learned(SPEEDS)
        self.speeds = {name: Speed(**value) for name, value in raw_speeds.items()}
        self.llm_footprints = {
            k: int(v) for k, v in (await self._store.get_learned(LLM_FOOTPRINTS)).items()
        }
        self.image_peaks = {
            k: int(v) for k, v in (await self._store.get_learned(IMAGE_PEAKS)).items()
        }
        self.version += 1
        self._profiles.clear()
        log.info(
            "learned so far: %d model speeds, %d LLM footprints, %d image footprints",
            len(self.speeds),
            len(self.llm_footprints),
            len(self.image_peaks),
        )

    # -- the catalogue --------------------------------------------------------------------

    def catalog(
        self,
        available: Iterable[AvailableModelInfo],
        *,
        snapshots: Sequence[object] | None = None,
    ) -> dict[str, ModelProfile]:
        """One profile per model any agent offers (a new dict; the profiles are shared).

        `snapshots` names where `available` comes from: the agents' latest status objects, each
        replaced (never changed) when a new snapshot arrives. While they are the same objects
        and nothing was learned since the previous call, that call's catalogue is returned and
        `available` is not read. Without `snapshots` the catalogue is always rebuilt.
        """
        if (
            snapshots is not None
            and self._catalog_version == self.version
            and self._catalog_snapshots is not None
            and len(snapshots) == len(self._catalog_snapshots)
            and all(new is old for new, old in zip(snapshots, self._catalog_snapshots, strict=True))
        ):
            return dict(self._catalog)
        models: dict[str, ModelProfile] = {}
        for model in available:
            if model.name not in models:
                models[model.name] = self._profile(model)
        self._catalog = models
        self._catalog_version = self.version
        # Held, so the objects stay alive and no later snapshot can be mistaken for them.
        self._catalog_snapshots = tuple(snapshots) if snapshots is not None else None
        # Models no agent offers any more are forgotten.
        for name in self._profiles.keys() - models.keys():
            del self._profiles[name]
        return dict(models)

    def _profile(self, model: AvailableModelInfo) -> ModelProfile:
        """`model`'s profile, rebuilt only if what it is built from changed."""
        capabilities = tuple(model.capabilities) if model.capabilities is not None else None
        figures = (model.size_bytes, model.family, model.parameter_size, capabilities)
        cached = self._profiles.get(model.name)
        if cached is not None and cached[0] == figures and model.name not in self._stale:
            return cached[1]
        built = profile(
            model.name,
            file_bytes=model.size_bytes,
            family=model.family,
            parameter_size=model.parameter_size,
            quality_override=self._quality.get(model.name),
            speed=self.speeds.get(model.name, Speed()),
            footprints=self.llm_footprints,
            num_ctx=DEFAULT_NUM_CTX,
            capabilities=capabilities,
        )
        self._profiles[model.name] = (figures, built)
        self._stale.discard(model.name)
        return built

    def image_peak(self, key: ImageKey, hint_bytes: int | None) -> tuple[int, str]:
        """The planned peak VRAM of an image job with `key`, and where the figure comes from."""
        return estimate_image_peak(key, self.image_peaks, hint_bytes)

    # -- learning -------------------------------------------------------------------------

    async def record_generation(
        self, model: str, final: Mapping[str, Any], *, was_loaded: bool
    ) -> None:
        """Fold Ollama's final line of one generation into the model's speeds. Returns without
        waiting for the store: the speed is written with the next batch."""
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
        self.version += 1
        self._stale.add(model)
        self._save_speed(model)

    def _save_speed(self, model: str) -> None:
        speed = self.speeds[model]
        value = {
            "decode_tokens_per_s": speed.decode_tokens_per_s,
            "prompt_tokens_per_s": speed.prompt_tokens_per_s,
            "load_s": speed.load_s,
            "samples": speed.samples,
        }
        self._store.put_learned_soon(SPEEDS, model, value)

    async def record_load(
        self, model: str, num_ctx: int, vram_bytes: int, size_bytes: int, load_s: float
    ) -> None:
        """Fold one measured load (its VRAM, size and time) into the model's footprint and speed.
        The footprint is committed now; the speed goes with the next batch."""
        self.llm_footprints = learn_llm_footprint(
            self.llm_footprints, model, num_ctx, vram_bytes, size_bytes
        )
        key = llm_key(model, num_ctx)
        self.speeds[model] = learn_load(self.speeds.get(model, Speed()), load_s)
        self.version += 1
        self._stale.add(model)
        self._save_speed(model)
        await self._store.put_learned(LLM_FOOTPRINTS, key, self.llm_footprints[key])

    async def record_image_peak(self, key: ImageKey, peak_bytes: int) -> None:
        """Fold one image job's measured peak VRAM into the peaks learned for its key."""
        self.image_peaks = learn_image_peak(self.image_peaks, key, peak_bytes)
        await self._store.put_learned(IMAGE_PEAKS, key.encode(), self.image_peaks[key.encode()])
