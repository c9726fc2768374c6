"""Deterministic embedding vectors for the emulated Ollama (simulated-desktop layer).

The emulator runs no model, but a client should get vectors that behave like embeddings: the
same text gives the same vector, different texts different ones, and their length is the
model's. Pure functions of their inputs.
"""

from __future__ import annotations

import math
import struct

from gpu_agent.sim import text

# Raw vectors are drawn at this scale per component, so they are not unit length: the legacy
# /api/embeddings answers them as they are, and /api/embed normalises them.
_RAW_SCALE = 0.05


def raw_embedding(seed: int, model: str, content: str, dimensions: int) -> list[float]:
    """The model's (unnormalised) vector for `content`, as float32 values."""
    rng = text.keyed_rng("embedding", seed, model, content)
    return [_float32(rng.gauss(0.0, _RAW_SCALE)) for _ in range(dimensions)]


def normalize(vector: list[float]) -> list[float]:
    """`vector` scaled to unit L2 length, as Ollama's /api/embed returns it (float32)."""
    norm = math.sqrt(sum(v * v for v in vector))
    scale = 1.0 / max(norm, 1e-12)
    return [_float32(v * scale) for v in vector]


def truncate(vector: list[float], dimensions: int) -> list[float]:
    """The first `dimensions` components, normalised again (Matryoshka truncation), when
    0 < dimensions < len(vector); else `vector` unchanged."""
    if 0 < dimensions < len(vector):
        return normalize(vector[:dimensions])
    return vector


def _float32(value: float) -> float:
    """`value` rounded to the nearest float32, and to the 8 significant digits that tell
    float32 values apart, so the JSON stays as short as Ollama's."""
    single: float = struct.unpack("f", struct.pack("f", value))[0]
    return float(f"{single:.8g}")
