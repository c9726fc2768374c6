"""OpenAI's request and answer shapes, as far as the services read or make them (value layer).

Ollama serves these routes under `/v1`; the agent passes them through and the controller
schedules them, so both describe them with these models. A request model names the fields the
services read and the constraints Ollama enforces on them; every other field goes on to Ollama
untouched (`extra="allow"`). The checks are strict (no `"5"` for a number, no `1` for a
boolean), as Ollama's Go decoder is.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpu_common.schema import integral

NOT_BLANK = (
    r"[^\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f"
    r"\u205f\u3000]"
)
"""Anything but Python's whitespace (what str.strip() removes), spelled as code points so that
Python and the JSON Schema (ECMA 262) regexes agree: a model name that is not blank."""
# "float" or "base64" in any case, as Ollama compares them, or empty for the default.
ENCODING_PATTERN = r"^([Ff][Ll][Oo][Aa][Tt]|[Bb][Aa][Ss][Ee]64)?$"


class _OpenAIRequest(BaseModel):
    """Base of the OpenAI request models: strict types, unknown fields passed on."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(pattern=NOT_BLANK, description="the model to run")


class OpenAITextPart(BaseModel):
    """A text part of a message's content."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class OpenAIMessage(BaseModel):
    """One chat message: its role and its content, a string or a list of text parts. (Ollama
    also takes `image_url` parts holding base64 data URLs, for models that see images.)"""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str | None = None
    content: str | list[OpenAITextPart]


class OpenAIChatRequest(_OpenAIRequest):
    """`POST /v1/chat/completions`: the fields read before the request goes on."""

    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool | None = Field(default=None, description="SSE chunks ending in data: [DONE]")
    max_tokens: int | None = Field(default=None, description="Ollama's num_predict")

    _integral = field_validator("max_tokens", mode="before")(integral)


class OpenAICompletionRequest(_OpenAIRequest):
    """`POST /v1/completions`: a string prompt (Ollama takes no list of prompts)."""

    prompt: str | None = None
    stream: bool | None = Field(default=None, description="SSE chunks ending in data: [DONE]")
    max_tokens: int | None = Field(default=None, description="Ollama's num_predict")

    _integral = field_validator("max_tokens", mode="before")(integral)


class OpenAIEmbeddingRequest(_OpenAIRequest):
    """`POST /v1/embeddings`: a text or a non-empty list of texts."""

    input: str | list[str] = Field(json_schema_extra={"minItems": 1})
    dimensions: int | None = Field(
        default=None, description="keep the first N components (when 0 < N < the length)"
    )
    encoding_format: str | None = Field(
        default=None, pattern=ENCODING_PATTERN, description="float (default) or base64"
    )

    _integral = field_validator("dimensions", mode="before")(integral)

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("invalid input")
        return value


class OpenAIModel(BaseModel):
    """One model as `/v1/models` lists it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["model"]
    created: int = Field(description="Unix seconds: when the model was last modified")
    owned_by: str


class OpenAIModelList(BaseModel):
    """`GET /v1/models`: Ollama answers `data: null` when it has no model."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[OpenAIModel] | None


def model_entry(name: str, created: int, owned_by: str | None = None) -> dict[str, Any]:
    """`name` as `/v1/models` lists it; the owner is the name's namespace ("library" for
    Ollama's own library) unless `owned_by` says otherwise."""
    owner = owned_by or (name.split("/")[-2] if "/" in name else "library")
    return {"id": name, "object": "model", "created": created, "owned_by": owner}
