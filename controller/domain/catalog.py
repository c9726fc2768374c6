"""Default beliefs about models before anything is measured (pure core).

Quality is a 0-100 score: by default it grows with the logarithm of the parameter count, with a
small bonus per family, and the config can override it per model. Speeds default to what the
parameter count implies on a 504 GB/s card; measurements replace them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from controller.domain.footprints import Speed, llm_key
from controller.domain.types import ModelProfile

FAMILY_QUALITY_BONUS: Mapping[str, float] = {"qwen2": 3.0, "qwen3": 5.0, "gemma3": 2.0}
# Bytes of GPU memory per byte of GGUF file, for KV cache and compute graph at ~4k context.
RUNTIME_OVERHEAD = 1.15
DEFAULT_NUM_CTX = 4096
GPU_BANDWIDTH_BYTES_PER_S = 504e9
# Families of embedding-only architectures, for an Ollama too old to list capabilities (before
# 0.12): BERT and its variants, which Ollama loads with pooling and no completion.
EMBEDDING_FAMILIES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2"})


def is_embedding_model(capabilities: Sequence[str] | None, family: str | None) -> bool:
    """Whether a model serves only embeddings: it lists "embedding" and not "completion", or,
    when its Ollama lists no capabilities, its family is an embedding architecture."""
    if capabilities is not None:
        return "embedding" in capabilities and "completion" not in capabilities
    return family in EMBEDDING_FAMILIES


def parameter_billions(parameter_size: str | None, name: str) -> float:
    """'14.8B' -> 14.8; falls back to a size tag in the name ('qwen2.5:14b'); else 7."""
    for text in (parameter_size or "", name.rsplit(":", 1)[-1]):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([BbMm])\s*", text)
        if match:
            value = float(match.group(1))
            return value / 1000 if match.group(2) in "Mm" else value
    return 7.0


def default_quality(name: str, family: str | None, parameter_size: str | None) -> float:
    """A 0-100 score before any override: grows with log2 of the parameter count, plus a
    family bonus."""
    billions = parameter_billions(parameter_size, name)
    score = 30.0 + 12.0 * math.log2(1.0 + billions) + FAMILY_QUALITY_BONUS.get(family or "", 0.0)
    return round(min(100.0, max(0.0, score)), 1)


def profile(
    name: str,
    *,
    file_bytes: int,
    family: str | None,
    parameter_size: str | None,
    quality_override: float | None,
    speed: Speed,
    footprints: Mapping[str, int],
    num_ctx: int = DEFAULT_NUM_CTX,
    capabilities: Sequence[str] | None = None,
) -> ModelProfile:
    """The controller's belief about `name`, from what was measured and sensible defaults."""
    learned = footprints.get(llm_key(name, num_ctx))
    size = learned if learned is not None else int(file_bytes * RUNTIME_OVERHEAD)
    # Decode is bandwidth-bound: one pass over the weights per token plus ~2.5 ms overhead.
    default_decode = 1.0 / (file_bytes / GPU_BANDWIDTH_BYTES_PER_S + 0.0025) if file_bytes else 30.0
    default_prompt = 30_000.0 / max(1.0, parameter_billions(parameter_size, name))
    default_load = 1.2 + file_bytes / 2.5e9
    quality = (
        quality_override
        if quality_override is not None
        else default_quality(name, family, parameter_size)
    )
    return ModelProfile(
        name=name,
        quality=quality,
        vram_bytes=size,
        size_bytes=size,
        decode_tokens_per_s=speed.decode_tokens_per_s or default_decode,
        prompt_tokens_per_s=speed.prompt_tokens_per_s or default_prompt,
        load_s=speed.load_s or default_load,
        measured=speed.samples > 0 or learned is not None,
        embedding=is_embedding_model(capabilities, family),
    )
