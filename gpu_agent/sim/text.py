"""Deterministic text for the emulated Ollama (simulated-desktop layer).

The emulator never runs a model, but clients should see plausible output whose length, pieces and
token counts follow from the request alone. Everything here is a pure function of its inputs: the
same request to an emulator with the same seed yields the same words, token by token.
"""

from __future__ import annotations

import hashlib
import json
import math
import random

# A fixed vocabulary: each entry is emitted as one token (with a leading space after the first).
_VOCABULARY_LINES = (
    "the model answer question system memory graphics card desktop request response token",
    "prompt context layer weight cache stream image render light shadow colour texture scene",
    "camera frame motion studio artist design sketch draft review project deadline client",
    "budget schedule queue worker service network signal value result simple clear quick",
    "careful steady bright quiet large small early late local remote shared private public",
    "common special useful and or but so because while when where which that this with from",
    "into over under between through about after before is are was were can could should",
    "would will may might must makes keeps holds moves reads writes sends takes gives finds",
    "shows builds checks loads frees waits runs starts stops learns a an every each some many",
    "few most other same new old first second last next whole part half time day hour minute",
    "idea plan step way point reason detail example pattern choice balance limit space room",
    "window table list note story word it they we you one nothing everything something here",
    "there now then again also only still just even often rarely",
)
VOCABULARY: tuple[str, ...] = tuple(word for line in _VOCABULARY_LINES for word in line.split())
# Token ids are drawn from a Llama-3-sized id space so `context` arrays look real.
VOCABULARY_SIZE = 128_256
MIN_OUTPUT_TOKENS = 40
MAX_OUTPUT_TOKENS = 300


def keyed_rng(*parts: object) -> random.Random:
    """A `random.Random` seeded by a stable hash of `parts` (JSON-serialisable values)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()
    return random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))


def count_tokens(text: str) -> int:
    """Tokens a BPE tokenizer would give `text`, approximated as one per four characters."""
    return math.ceil(len(text) / 4)


def output_length(rng: random.Random) -> int:
    """How many tokens an unconstrained answer runs to."""
    return rng.randint(MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)


def pieces(rng: random.Random, count: int) -> list[str]:
    """`count` streamed pieces (one token each) forming sentences of vocabulary words."""
    out: list[str] = []
    sentence_left = 0
    while len(out) < count:
        if sentence_left == 0:
            sentence_left = rng.randint(6, 16)
            word = rng.choice(VOCABULARY).capitalize()
            out.append(word if not out else " " + word)
            sentence_left -= 1
            continue
        sentence_left -= 1
        if sentence_left == 0:
            out.append(".")
        elif rng.random() < 0.07:
            out.append(",")
        else:
            out.append(" " + rng.choice(VOCABULARY))
    return out


def token_ids(rng: random.Random, count: int) -> list[int]:
    """`count` plausible token ids (for the `context` array of /api/generate)."""
    return [rng.randrange(1, VOCABULARY_SIZE) for _ in range(count)]


def cut_at_stop(parts: list[str], stops: tuple[str, ...]) -> tuple[list[str], bool]:
    """Cut the pieces where the first stop sequence begins; True if one was found.

    Like Ollama, neither the stop sequence nor anything after it is returned, even when it
    begins inside an earlier piece (Ollama holds such pieces back until it can tell).
    """
    if not any(stops):
        return parts, False
    text = ""
    for index, piece in enumerate(parts):
        candidate = text + piece
        found = [candidate.find(stop) for stop in stops if stop and stop in candidate]
        if found:
            cut = min(found)
            kept: list[str] = []
            length = 0
            for part in parts[: index + 1]:
                if length + len(part) > cut:
                    if cut > length:
                        kept.append(part[: cut - length])
                    break
                kept.append(part)
                length += len(part)
            return kept, True
        text = candidate
    return parts, False
