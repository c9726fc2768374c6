"""`/upload/image` and `/upload/mask` of the emulated ComfyUI (simulator layer).

ComfyUI 0.3.64's semantics (server.py; protocols-2.md E), run on a worker thread:

* multipart fields `image` (the file), `type` (`input` by default, `temp`, `output`; any other
  value fails inside the handler: 500), `subfolder` (one that leaves the folder: 400) and
  `overwrite` (`"true"` or `"1"`);
* no file, or a file without a name: 400;
* on a name clash without `overwrite`, a file with the same SHA-256 is not written again and its
  name is returned; otherwise the next free `stem (i).ext` is taken, i = 1, 2, ...;
* the answer is `{"name", "subfolder" (as sent), "type"}`.

`/upload/mask` takes the same fields and `original_ref` (JSON `{filename, subfolder, type}`,
type `output` by default): it writes the original picture with the mask's alpha channel as a
PNG. Its own refusals (a bad name, a subfolder escape) are dropped as ComfyUI drops them: the
client still gets 200 and the name, and nothing is written; so is a missing original. A missing
`original_ref`, or a mask of another size than its original, raises: the caller answers 500.

The emulator decodes no pixels: the composite is a PNG of the original's size whose colours are
the emulator's pattern for that file and whose alpha is opaque when the mask has no alpha
channel, else transparent in the middle half (the usual painted region).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from gpu_agent.sim.png import encode_png, gradient_rows, with_alpha
from gpu_common.image_files import probe_image

SaveFunction = Callable[[bytes, Path], None]


@dataclass(frozen=True, slots=True)
class UploadFolders:
    """The server's input, output and temp folders."""

    input: Path
    output: Path
    temp: Path

    def by_type(self, kind: str) -> Path:
        """The folder of an upload `type`; KeyError for any other (ComfyUI's unbound name)."""
        return {"input": self.input, "output": self.output, "temp": self.temp}[kind]


def upload_image(
    post: Mapping[str, Any], folders: UploadFolders, save: SaveFunction | None = None
) -> web.Response:
    """ComfyUI's `image_upload`: write the posted file (or let `save` write it) and answer."""
    image = post.get("image")
    overwrite = post.get("overwrite")
    kind = "input" if post.get("type") is None else str(post.get("type"))
    upload_dir = str(folders.by_type(kind))
    if not isinstance(image, web.FileField):
        return web.Response(status=400)
    filename = image.filename
    if not filename:
        return web.Response(status=400)
    subfolder = str(post.get("subfolder", ""))
    full_folder = os.path.join(upload_dir, os.path.normpath(subfolder))
    filepath = os.path.abspath(os.path.join(full_folder, filename))
    if os.path.commonpath((upload_dir, filepath)) != upload_dir:
        return web.Response(status=400)
    os.makedirs(full_folder, exist_ok=True)
    data = image.file.read()
    stem, extension = os.path.splitext(filename)
    duplicate = False
    if overwrite not in ("true", "1"):
        index = 1
        while os.path.exists(filepath):
            if _sha256(Path(filepath)) == hashlib.sha256(data).hexdigest():
                duplicate = True
                break
            filename = f"{stem} ({index}){extension}"
            filepath = os.path.join(full_folder, filename)
            index += 1
    if not duplicate:
        if save is not None:
            save(data, Path(filepath))
        else:
            Path(filepath).write_bytes(data)
    return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})


def upload_mask(post: Mapping[str, Any], folders: UploadFolders) -> web.Response:
    """ComfyUI's `/upload/mask`: the original with the mask's alpha, saved under the mask's
    name. Raises where ComfyUI's handler raises (the caller answers 500)."""

    def save(mask: bytes, target: Path) -> None:
        reference = json.loads(post.get("original_ref"))  # type: ignore[arg-type]
        original = _original_path(reference, folders)
        if original is None or not original.is_file():
            return  # ComfyUI writes nothing and still answers with the name
        composite(original.read_bytes(), mask, target)

    return upload_image(post, folders, save)


def _original_path(reference: Mapping[str, Any], folders: UploadFolders) -> Path | None:
    """The file `original_ref` names, or None where ComfyUI's check refuses it."""
    filename = str(reference["filename"])
    base: Path | None = None
    for kind in ("input", "output", "temp"):
        if filename.endswith(f" [{kind}]"):
            filename, base = filename[: -len(kind) - 3], folders.by_type(kind)
    if not filename or filename.startswith("/") or ".." in filename:
        return None
    if base is None:
        kind = str(reference.get("type", "output"))
        if kind not in ("input", "output", "temp"):
            return None
        base = folders.by_type(kind)
    subfolder = str(reference.get("subfolder", ""))
    if subfolder:
        candidate = os.path.abspath(os.path.join(base, subfolder))
        if os.path.commonpath((candidate, str(base))) != str(base):
            return None
        base = Path(candidate)
    return base / filename


def composite(original: bytes, mask: bytes, target: Path) -> None:
    """Write `original` with `mask`'s alpha channel to `target` as an RGBA PNG.

    ValueError when either is not a picture or their sizes differ (Pillow's `putalpha`)."""
    image, alpha = probe_image(original), probe_image(mask)
    if (image.width, image.height) != (alpha.width, alpha.height):
        raise ValueError("images do not match")
    width, height = image.width, image.height
    seed = int.from_bytes(hashlib.sha256(original).digest()[:4], "big")
    rows = with_alpha(
        gradient_rows(width, height, seed), _alpha_rows(width, height, alpha.has_alpha)
    )
    target.write_bytes(encode_png(width, height, rows, alpha=True, level=4))


def _alpha_rows(width: int, height: int, painted: bool) -> Iterator[bytes]:
    opaque = b"\xff" * width
    if not painted:
        for _ in range(height):
            yield opaque
        return
    left, right = width // 4, width - width // 4
    hole = b"\xff" * left + b"\x00" * (right - left) + b"\xff" * (width - right)
    for y in range(height):
        yield hole if height // 4 <= y < height - height // 4 else opaque


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
