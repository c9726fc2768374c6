"""Reading a `multipart/form-data` body within limits (adapter layer, shared by both services).

aiohttp's `request.post()` reads the whole body under the app's one `client_max_size`, which is
sized for JSON; pictures need a larger bound per file, and a bound on how many. `read_form`
streams the parts and stops at the first limit crossed: a file over `max_file_bytes` or a body
over `max_total_bytes` is `PayloadTooLarge` (413), more than `max_files` files or a text field
over `max_field_bytes` (default `MAX_FIELD_BYTES`) is `BadRequest`, and so is a body that is
not multipart at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from gpu_common.errors import BadRequest, PayloadTooLarge

# A text field (a JSON document describing the request, a folder name) is never larger.
MAX_FIELD_BYTES = 1024 * 1024
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class FormFile:
    """One uploaded file: the form field it came in, its file name and type as sent."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Form:
    """A parsed form: text fields by name (the last one of a name wins) and files in order."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[FormFile] = field(default_factory=list)


def is_form(request: web.Request) -> bool:
    """Whether the request's body is `multipart/form-data`."""
    return request.content_type == "multipart/form-data"


async def read_form(
    request: web.Request,
    *,
    max_file_bytes: int,
    max_files: int,
    max_total_bytes: int,
    max_field_bytes: int = MAX_FIELD_BYTES,
    fields: frozenset[str] | None = None,
) -> Form:
    """The request's multipart body, read part by part within the limits; a part whose name
    is not in `fields` (when given) is refused."""
    if not is_form(request):
        raise BadRequest(f"body must be multipart/form-data, not {request.content_type!r}")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    form = Form()
    total = 0
    try:
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not accepted")
            name = part.name or ""
            if fields is not None and name not in fields:
                raise BadRequest(
                    f"unknown form field {name[:40]!r}; known: {', '.join(sorted(fields))}"
                )
            if part.filename is not None:
                if len(form.files) >= max_files:
                    raise BadRequest(f"at most {max_files} files may be uploaded at once")
                data = await _read(part, max_file_bytes, f"file {part.filename!r}")
                content_type = part.headers.get("Content-Type", "application/octet-stream")
                form.files.append(FormFile(name, part.filename, content_type, data))
            else:
                data = await _read(part, max_field_bytes, f"field {name!r}")
                try:
                    form.fields[name] = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise BadRequest(f"field {name!r} is not UTF-8 text") from exc
            total += len(data)
            if total > max_total_bytes:
                raise PayloadTooLarge(f"the form is larger than {max_total_bytes} bytes")
    except (ValueError, AssertionError, UnicodeDecodeError, HttpProcessingError) as exc:
        # aiohttp's reader raises these for a body that does not follow its boundary, or for a
        # part whose headers are not valid HTTP.
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    return form


async def _read(part: BodyPartReader, limit: int, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await part.read_chunk(_CHUNK_BYTES)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            if what.startswith("field"):
                raise BadRequest(f"{what} is longer than {limit} bytes")
            raise PayloadTooLarge(f"{what} is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
