"""Input pictures of image jobs (imperative shell): the upload form, the files, the agent.

`POST /v1/images` may come as `multipart/form-data` instead of JSON (the form is `FORM_SCHEMA`):

* `job`: the JSON body the JSON form takes (`{"workflow", "vram_bytes"?, "priority"?}`);
* one file part per input picture, in the field `image` (or `mask` for a mask), whose file name is
  the name the workflow's LoadImage or LoadImageMask node gives it (`"image": "sketch.png"`);
* `mask_of` (optional): JSON `{mask name: image name}`, a mask to paint onto another input as
  its alpha channel (ComfyUI's `/upload/mask`); the workflow then loads the mask's name.

Each picture must be a PNG, JPEG or WebP file (told by its first bytes, not by its name or type)
within the size and pixel limits. Accepted pictures are written to the data folder under their
SHA-256 (one file per content, however many jobs use it) and fsynced before the job's row is
committed, so a job that was answered 202 has its pictures even after a SIGKILL.

At dispatch, `upload_inputs` hands each picture to the agent, which uploads it to ComfyUI, and
returns the workflow with its loaders naming the files ComfyUI chose.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from controller.agents import AgentLink
from controller.domain.image_inputs import (
    UPLOAD_SUBFOLDER,
    InputKind,
    InputSpec,
    input_problems,
    rewrite_inputs,
    upload_name,
)
from controller.errors import AgentRejected, ControllerError
from controller.schema import ImageSubmit
from controller.store import StoredInput
from gpu_common.errors import BadRequest, PayloadTooLarge
from gpu_common.forms import FormFile, read_form
from gpu_common.http import parse_json, validate
from gpu_common.image_files import EXTENSIONS, NotAnImage, probe_image
from gpu_common.schema import UploadResult

# ComfyUI's own limit on a side (MAX_RESOLUTION).
MAX_SIDE = 16384
# The most pictures (and, apart, masks) a form may carry, whatever `max_inputs` allows.
MAX_FILES_PER_FIELD = 64
_MAX_NAME = 255

# Whether a file is a picture, and whether the workflow loads it by that name, the schema cannot
# say: such refusals carry their own code, `input_rejected`.
FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["job"],
    "additionalProperties": False,
    "properties": {
        "job": {"$ref": "#/components/schemas/ImageSubmit"},
        "image": {
            "type": "array",
            "maxItems": MAX_FILES_PER_FIELD,
            "items": {"type": "string", "format": "binary"},
            "description": "input pictures (PNG, JPEG, WebP); each file's name is the name the "
            "workflow's LoadImage or LoadImageMask node gives it",
        },
        "mask": {
            "type": "array",
            "maxItems": MAX_FILES_PER_FIELD,
            "items": {"type": "string", "format": "binary"},
            "description": "input masks, named as the images are",
        },
        "mask_of": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "{mask name: image name}: masks painted onto an input picture",
        },
    },
    "encoding": {"job": {"contentType": "application/json"}},
}


class InputRejected(BadRequest):
    """An input picture, or how the form names it, is not acceptable (400 `input_rejected`):
    not a PNG, JPEG or WebP file, too many pixels, not loaded by the workflow, ..."""

    code = "input_rejected"


class InputUnusable(ControllerError):
    """A job's input picture cannot reach ComfyUI; retrying cannot help."""

    code = "input_unusable"
    http_status = 500


class InputLost(InputUnusable):
    """A job's input picture is missing from the data folder, or its content changed."""

    code = "input_lost"


class InputRefused(InputUnusable):
    """The agent (or its ComfyUI) refused one of a job's input pictures (a 4xx)."""

    code = "input_refused"
    http_status = 502


@dataclass(frozen=True, slots=True)
class InputLimits:
    """How large, how many: bytes per picture, pixels per picture, pictures per job."""

    max_bytes: int
    max_pixels: int
    max_count: int


@dataclass(frozen=True, slots=True)
class NewInput:
    """An accepted input picture, not yet stored."""

    stored: StoredInput
    data: bytes


async def read_submission(
    request: web.Request, limits: InputLimits, *, max_job_bytes: int
) -> tuple[ImageSubmit, list[NewInput]]:
    """The job and its checked input pictures from a `multipart/form-data` submission."""
    form = await read_form(
        request,
        # The job's JSON may come as a file part too (some clients send typed parts so).
        max_file_bytes=max(limits.max_bytes, max_job_bytes),
        # Any number the form's schema allows, so that more than max_count get the reason
        # below; the total stays bounded by the size limits.
        max_files=2 * MAX_FILES_PER_FIELD + 1,
        max_total_bytes=(limits.max_count + 1) * limits.max_bytes + max_job_bytes,
        max_field_bytes=max_job_bytes,
        fields=frozenset({"job", "image", "mask", "mask_of"}),
    )
    if "image" in form.fields or "mask" in form.fields:
        raise BadRequest("image and mask must be files (parts with a file name)")
    job_file = next((f for f in form.files if f.field == "job"), None)
    raw = form.fields.get("job", job_file.data.decode("utf-8", "replace") if job_file else None)
    if raw is None:
        raise BadRequest("the form needs the job's JSON in the field 'job'")
    body = validate(parse_json(raw.encode()), ImageSubmit)
    mask_of = _mask_of(form.fields.get("mask_of"))
    files = [f for f in form.files if f.field != "job"]
    if len(files) > limits.max_count:
        raise InputRejected(f"at most {limits.max_count} input pictures per job")
    inputs = [_accept(file, limits, mask_of) for file in files]
    unknown = set(mask_of) - {item.stored.name for item in inputs if item.stored.kind == "mask"}
    if unknown:
        raise InputRejected(f"mask_of names masks not uploaded: {', '.join(sorted(unknown))}")
    specs = [InputSpec(i.stored.name, i.stored.kind, i.stored.mask_of) for i in inputs]
    problems = input_problems(body.workflow, specs)
    if problems:
        raise InputRejected("; ".join(problems))
    return body, inputs


def _mask_of(raw: str | None) -> dict[str, str]:
    if raw is None:
        return {}
    value = parse_json(raw.encode())
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InputRejected("mask_of must be a JSON object of mask name -> image name")
    return value


def _accept(file: FormFile, limits: InputLimits, mask_of: Mapping[str, str]) -> NewInput:
    """One uploaded part as an input, or BadRequest (PayloadTooLarge) saying why not."""
    if file.field not in ("image", "mask"):
        raise InputRejected(
            f"file {file.filename!r} came in field {file.field!r}; use image or mask"
        )
    name = file.filename
    if not name or len(name) > _MAX_NAME or any(ord(ch) < 32 for ch in name):
        raise InputRejected(
            f"input name {name[:40]!r} must be 1 to {_MAX_NAME} printable characters"
        )
    if len(file.data) > limits.max_bytes:
        raise PayloadTooLarge(f"input {name!r} is larger than {limits.max_bytes} bytes")
    try:
        header = probe_image(file.data)
    except NotAnImage as exc:
        raise InputRejected(
            f"input {name!r}: only PNG, JPEG and WebP are accepted ({exc})"
        ) from exc
    if header.width > MAX_SIDE or header.height > MAX_SIDE or header.pixels > limits.max_pixels:
        raise InputRejected(
            f"input {name!r} is {header.width}x{header.height}: at most {MAX_SIDE} pixels a "
            f"side and {limits.max_pixels} pixels in all"
        )
    kind: InputKind = "mask" if file.field == "mask" else "image"
    stored = StoredInput(
        name=name,
        sha256=hashlib.sha256(file.data).hexdigest(),
        format=header.format,
        kind=kind,
        mask_of=mask_of.get(name) if kind == "mask" else None,
    )
    return NewInput(stored, file.data)


class InputFiles:
    """Input pictures in a folder, one file per content: `<sha256>.<extension>`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, item: StoredInput) -> Path:
        """Where the picture's file is kept."""
        extension = EXTENSIONS.get(item.format, ".bin")
        return self.folder / f"{item.sha256}{extension}"

    async def save(self, inputs: Sequence[NewInput]) -> None:
        """Write every picture not kept yet, and make it durable, before returning."""
        await asyncio.to_thread(self._save, inputs)

    def _save(self, inputs: Sequence[NewInput]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        wrote = False
        for item in inputs:
            path = self.path(item.stored)
            if path.is_file() and path.stat().st_size == len(item.data):
                continue  # the same content (its name is its hash) is kept already
            temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
            with temporary.open("wb") as handle:
                handle.write(item.data)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(path)
            wrote = True
        if wrote:
            # The new names must survive a crash too: sync the folder's entries.
            descriptor = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    async def load(self, item: StoredInput) -> bytes:
        """The picture's bytes; `InputLost` if the file is gone or no longer that content."""
        path = self.path(item)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise InputLost(f"input {item.name!r} ({path.name}) cannot be read: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise InputLost(f"input {item.name!r} ({path.name}) no longer has its content")
        return data


async def upload_inputs(
    link: AgentLink, files: InputFiles, workflow: Mapping[str, Any], inputs: Sequence[StoredInput]
) -> dict[str, Any]:
    """Upload `inputs` to `link`'s ComfyUI and return `workflow` naming what ComfyUI stored.

    Images go first, since a mask is painted onto one. Names come from the content, so a retry
    uploads under the same names and ComfyUI's hash check keeps one copy; a mask's composite is
    overwritten, its name being unique to the mask and its original. Raises `InputLost`,
    `InputRefused` when the agent or ComfyUI refuses a picture, and the link's other errors."""
    by_name = {item.name: item for item in inputs}
    uploaded: dict[str, str] = {}
    placed: dict[str, dict[str, str]] = {}
    for item in sorted(inputs, key=lambda i: i.kind != "image"):
        data = await files.load(item)
        original = by_name.get(item.mask_of) if item.mask_of is not None else None
        try:
            result = await _upload(link, item, data, original, placed)
        except AgentRejected as exc:
            raise InputRefused(
                f"{link.name} refused input {item.name!r}: {exc.status} {exc.agent_message}"
            ) from exc
        placed[item.name] = {
            "filename": result.name,
            "subfolder": result.subfolder,
            "type": result.type,
        }
        uploaded[item.name] = result.reference()
    return rewrite_inputs(workflow, uploaded)


async def _upload(
    link: AgentLink,
    item: StoredInput,
    data: bytes,
    original: StoredInput | None,
    placed: Mapping[str, dict[str, str]],
) -> UploadResult:
    if original is not None:
        name = upload_name(item.sha256, ".png", original.sha256)
        return await link.upload(
            data, name, subfolder=UPLOAD_SUBFOLDER, overwrite=True, mask_of=placed[original.name]
        )
    name = upload_name(item.sha256, EXTENSIONS.get(item.format, ".png"))
    return await link.upload(data, name, subfolder=UPLOAD_SUBFOLDER, overwrite=False)


def digest_inputs(inputs: Sequence[NewInput]) -> list[dict[str, Any]]:
    """What the inputs add to a submission's fingerprint (for `Idempotency-Key`)."""
    return [item.stored.wire() for item in inputs]


def describe(inputs: Sequence[StoredInput]) -> str:
    """A short list for the logs: `name (format)`."""
    return ", ".join(f"{item.name} ({item.format})" for item in inputs) or "none"


__all__ = [
    "FORM_SCHEMA",
    "InputFiles",
    "InputLimits",
    "InputLost",
    "InputRefused",
    "InputUnusable",
    "NewInput",
    "digest_inputs",
    "read_submission",
    "upload_inputs",
]
