"""What kind of picture a file holds, read from its first bytes (shared value code, pure).

`probe_image` names the format by its magic bytes and reads the pixel size (and whether there is
an alpha channel) from the header alone: PNG's IHDR, the first start-of-frame segment of a JPEG,
the VP8, VP8L or VP8X header of a WebP. Nothing is decoded, so a file's size in pixels is known
before a byte of pixel data is looked at, which is what a pixel limit needs. The layouts are the
formats' own specifications (PNG: ISO/IEC 15948; JPEG: ITU T.81 Annex B; WebP: RFC 9649).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

ImageFormat = Literal["png", "jpeg", "webp"]

MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}
EXTENSIONS: dict[str, str] = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_ALPHA_COLOUR_TYPES = (4, 6)  # greyscale + alpha, RGB + alpha
# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM and RST0-7 (SOI and EOI end the scan here).
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_VP8X_ALPHA = 0x10


class NotAnImage(ValueError):
    """The bytes are not a PNG, JPEG or WebP file whose header can be read."""


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """A picture's format, size in pixels and whether it carries an alpha channel."""

    format: ImageFormat
    width: int
    height: int
    has_alpha: bool

    @property
    def pixels(self) -> int:
        """Width times height."""
        return self.width * self.height

    @property
    def media_type(self) -> str:
        """The IANA media type of the format."""
        return MEDIA_TYPES[self.format]

    @property
    def extension(self) -> str:
        """The usual file name extension of the format, with its dot."""
        return EXTENSIONS[self.format]


def probe_image(data: bytes) -> ImageHeader:
    """The header of the PNG, JPEG or WebP file in `data`; `NotAnImage` saying why otherwise."""
    if data.startswith(PNG_SIGNATURE):
        header = _png(data)
    elif data.startswith(b"\xff\xd8\xff"):
        header = _jpeg(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        header = _webp(data)
    else:
        raise NotAnImage("not a PNG, JPEG or WebP file (unknown signature)")
    if header.width <= 0 or header.height <= 0:
        raise NotAnImage(f"{header.format} header gives a size of {header.width}x{header.height}")
    return header


def _png(data: bytes) -> ImageHeader:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise NotAnImage("PNG without an IHDR chunk")
    width, height, _depth, colour_type = struct.unpack(">IIBB", data[16:26])
    alpha = colour_type in _PNG_ALPHA_COLOUR_TYPES
    # A tRNS chunk before the image data gives a palette or colour key transparency.
    offset = 33
    while not alpha and offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind in (b"IDAT", b"IEND"):
            break
        alpha = kind == b"tRNS"
        offset += 12 + length
    return ImageHeader("png", width, height, alpha)


def _jpeg(data: bytes) -> ImageHeader:
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise NotAnImage(f"JPEG: no marker at byte {offset}")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte before a marker
            offset += 1
            continue
        if marker in _STANDALONE_MARKERS:
            offset += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, or the scan starts: no frame header came first
            break
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        if length < 2:
            raise NotAnImage(f"JPEG: segment of length {length} at byte {offset}")
        if marker in _SOF_MARKERS:
            if offset + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
            return ImageHeader("jpeg", width, height, False)
        offset += 2 + length
    raise NotAnImage("JPEG without a frame header")


def _webp(data: bytes) -> ImageHeader:
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30:
        if data[23:26] != b"\x9d\x01\x2a":
            raise NotAnImage("WebP (lossy): no VP8 start code")
        width, height = struct.unpack("<HH", data[26:30])
        return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF, False)
    if kind == b"VP8L" and len(data) >= 25:
        if data[20] != 0x2F:
            raise NotAnImage("WebP (lossless): no VP8L signature")
        (bits,) = struct.unpack("<I", data[21:25])
        width = (bits & 0x3FFF) + 1
        height = ((bits >> 14) & 0x3FFF) + 1
        return ImageHeader("webp", width, height, bool((bits >> 28) & 1))
    if kind == b"VP8X" and len(data) >= 30:
        flags = data[20]
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return ImageHeader("webp", width, height, bool(flags & _VP8X_ALPHA))
    raise NotAnImage(f"WebP with an unknown or short first chunk {kind!r}")
