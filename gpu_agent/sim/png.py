"""A tiny deterministic PNG writer for the emulated ComfyUI (simulator layer).

Images are 8-bit RGB (or RGBA), written with zlib and struct only, so every file the emulator
saves is a real PNG any viewer opens. Pixels are cheap patterns, not pictures: a seeded gradient
for sampled images and a solid fill for `EmptyImage`. Rows are built with slice assignment rather
than per pixel, and compressed at zlib level 1, so a 1024x1024 image takes milliseconds.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE_RGB = 2
_COLOR_TYPE_RGBA = 6
_FILTER_NONE = b"\x00"


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_png(
    width: int,
    height: int,
    rows: Iterable[bytes],
    *,
    text: Mapping[str, str] | None = None,
    level: int = 1,
    alpha: bool = False,
) -> bytes:
    """Encode `height` rows of `width` RGB pixels (3 bytes each, 4 with `alpha`; no filter
    byte) as a PNG.

    `text` becomes tEXt chunks (ComfyUI stores the prompt JSON there); keys must be Latin-1.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    row_bytes = width * (4 if alpha else 3)
    compressor = zlib.compressobj(level)
    parts: list[bytes] = []
    count = 0
    for row in rows:
        if len(row) != row_bytes:
            raise ValueError(f"row {count} has {len(row)} bytes, expected {row_bytes}")
        parts.append(compressor.compress(_FILTER_NONE + row))
        count += 1
    if count != height:
        raise ValueError(f"got {count} rows, expected {height}")
    parts.append(compressor.flush())
    colour_type = _COLOR_TYPE_RGBA if alpha else _COLOR_TYPE_RGB
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    chunks = [PNG_SIGNATURE, _chunk(b"IHDR", header)]
    for key, value in (text or {}).items():
        chunks.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("utf-8")))
    chunks.append(_chunk(b"IDAT", b"".join(parts)))
    chunks.append(_chunk(b"IEND", b""))
    return b"".join(chunks)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; `ValueError` if `data` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def gradient_rows(width: int, height: int, seed: int) -> Iterator[bytes]:
    """Rows of a seeded colour gradient: red across, green along the diagonal, blue down."""
    rng = random.Random(seed)
    red_offset, green_offset, blue_offset = (rng.randrange(256) for _ in range(3))
    red_slope, blue_slope = rng.choice((1, 2, 3)), rng.choice((1, 2, 3))
    red = bytes(((x * red_slope * 256) // width + red_offset) & 255 for x in range(width))
    # The green channel of row y is this ramp starting at y: a slice, not a per-pixel loop.
    diagonal = bytes((i * 256 // max(width, height)) & 255 for i in range(width + height))
    row = bytearray(width * 3)
    row[0::3] = red
    for y in range(height):
        start = (y + green_offset) % height
        row[1::3] = diagonal[start : start + width]
        blue = ((y * blue_slope * 256) // height + blue_offset) & 255
        row[2::3] = bytes((blue,)) * width
        yield bytes(row)


def solid_rows(width: int, height: int, rgb: tuple[int, int, int]) -> Iterator[bytes]:
    """Rows of one colour, as ComfyUI's `EmptyImage` makes them."""
    row = bytes(rgb) * width
    for _ in range(height):
        yield row


def with_alpha(rows: Iterable[bytes], alpha_rows: Iterable[bytes]) -> Iterator[bytes]:
    """RGB rows joined with rows of one alpha byte per pixel into RGBA rows."""
    for rgb, alpha in zip(rows, alpha_rows, strict=True):
        row = bytearray(len(alpha) * 4)
        row[0::4], row[1::4], row[2::4] = rgb[0::3], rgb[1::3], rgb[2::3]
        row[3::4] = alpha
        yield bytes(row)
