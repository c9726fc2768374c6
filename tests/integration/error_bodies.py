"""Reading an error answer in the shape its route family promises (`gpu_common.error_shapes`).

`/api/*` answers Ollama's `{"error": "message"}`, the OpenAI routes OpenAI's
`{"error": {"message", "type", "param", "code"}}`, every other route ours,
`{"error": {"code", "message"}}`; the code is in `X-GPU-Error` whatever the shape.
"""

from __future__ import annotations

from typing import Any

import httpx

from gpu_common.error_shapes import ERROR_CODE_HEADER, error_shape, openai_error_type


def error_of(response: httpx.Response) -> dict[str, Any]:
    """`{"code", "message"}` (and, in our own shape, `details`) of an error the service
    answered itself, after checking that its body has exactly the shape of the request's route
    family."""
    assert response.headers["Content-Type"].startswith("application/json")
    code = response.headers[ERROR_CODE_HEADER]
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    shape = error_shape(response.request.url.path)
    if shape == "ollama":
        assert isinstance(error, str), body
        return {"code": code, "message": error}
    assert isinstance(error, dict), body
    assert isinstance(error["message"], str)
    assert error["code"] == code
    if shape == "openai":
        assert error.keys() == {"message", "type", "param", "code"}, body
        assert error["type"] == openai_error_type(response.status_code)
        return {"code": code, "message": error["message"]}
    return dict(error)
