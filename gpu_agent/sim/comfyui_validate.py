"""Prompt validation for the emulated ComfyUI (simulator layer).

Follows ComfyUI 0.3.64's `validate_prompt` / `validate_inputs`: the error types, messages,
`node_errors` layout and the order of checks are the server's, so a client sees the same 400
bodies. Values that pass are coerced in place (an INT given as "7" becomes 7), as the server does,
and the queued prompt carries the coerced values.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpu_agent.sim.comfyui_nodes import InputSpec, NodeClass

Reason = dict[str, Any]
# Whether an image loader's file (`sub/name.png`, optionally ` [input]`) exists: LoadImage's and
# LoadImageMask's own check (VALIDATE_INPUTS), which replaces the list check for `image`.
ImageExists = Callable[[str], bool]
# Beyond this many choices the server leaves the list out of a value_not_in_list error.
_MAX_LISTED_CHOICES = 20


@dataclass(frozen=True, slots=True)
class Validation:
    """The verdict on one prompt: `ok`, the top-level error, valid outputs and per-node errors."""

    ok: bool
    error: Reason | None = None
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def top_error(kind: str, message: str, details: str = "") -> Reason:
    """A top-level error object, as `POST /prompt` returns it under `error`."""
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def is_canonical_uuid(value: object) -> bool:
    """True for a UUID string in canonical lowercase hyphenated form (newer servers require it)."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


class _InnerValidationError(Exception):
    """A linked node could not be looked up (dangling link, bad slot): ComfyUI's exception path."""


def validate_prompt(
    prompt: Mapping[str, Any],
    classes: Mapping[str, NodeClass],
    partial_targets: Sequence[str] | None = None,
    image_exists: ImageExists | None = None,
) -> Validation:
    """Validate `prompt` (node id -> {class_type, inputs}) against the class table.

    `image_exists` answers the image loaders' own check; without it every file exists."""
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if "class_type" not in node:
            return Validation(
                ok=False,
                error=top_error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                ),
            )
        cls = classes.get(node["class_type"])
        if cls is None:
            return Validation(
                ok=False,
                error=top_error(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                ),
            )
        if cls.output_node and (partial_targets is None or node_id in partial_targets):
            outputs.append(node_id)
    if not outputs:
        return Validation(ok=False, error=top_error("prompt_no_outputs", "Prompt has no outputs"))

    validated: dict[str, tuple[bool, list[Reason]]] = {}
    good: list[str] = []
    failures: list[tuple[str, list[Reason]]] = []
    node_errors: dict[str, Any] = {}
    for output_id in outputs:
        try:
            valid, reasons = _validate_node(prompt, classes, output_id, validated, image_exists)
        except Exception as exc:
            valid = False
            reasons = [_exception_reason("exception_during_validation", exc)]
            validated[output_id] = (False, reasons)
        if valid:
            good.append(output_id)
            continue
        failures.append((output_id, reasons))
        for node_id, (node_valid, node_reasons) in validated.items():
            # Nodes downstream of a broken one are invalid with no reasons; they are not listed.
            if node_valid or not node_reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": node_reasons,
                    "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"],
                },
            )
            entry["dependent_outputs"].append(output_id)
    if not good:
        details = "\n".join(
            f"{reason['message']}: {reason['details']}"
            for _, reasons in failures
            for reason in reasons
        )
        error = top_error(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
        )
        return Validation(ok=False, error=error, node_errors=node_errors)
    return Validation(ok=True, outputs=good, node_errors=node_errors)


def _exception_reason(kind: str, exc: Exception) -> Reason:
    message = "Exception when validating node"
    if kind == "exception_during_inner_validation":
        message = "Exception when validating inner node"
    return {
        "type": kind,
        "message": message,
        "details": str(exc),
        "extra_info": {"exception_type": type(exc).__name__, "traceback": []},
    }


def _validate_node(
    prompt: Mapping[str, Any],
    classes: Mapping[str, NodeClass],
    node_id: str,
    validated: dict[str, tuple[bool, list[Reason]]],
    image_exists: ImageExists | None = None,
) -> tuple[bool, list[Reason]]:
    if node_id in validated:
        return validated[node_id]
    node = prompt[node_id]
    inputs: dict[str, Any] = node.setdefault("inputs", {})
    cls = classes[node["class_type"]]
    errors: list[Reason] = []
    valid = True
    for spec in cls.required:
        if spec.name not in inputs:
            errors.append(
                {
                    "type": "required_input_missing",
                    "message": "Required input is missing",
                    "details": spec.name,
                    "extra_info": {"input_name": spec.name},
                }
            )
            continue
        value = inputs[spec.name]
        if isinstance(value, list):
            linked_ok = _check_link(prompt, classes, spec, value, errors, validated, image_exists)
            valid = valid and linked_ok
            continue
        if spec.name in cls.validated_inputs:
            continue
        reason = _check_value(spec, inputs)
        if reason is not None:
            errors.append(reason)
    for name in cls.validated_inputs:
        # The class's own check runs after the others, on the value as given.
        value = inputs.get(name)
        if name not in inputs or isinstance(value, list):
            continue
        if image_exists is not None and not image_exists(str(value)):
            errors.append(
                {
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": f"{name} - Invalid image file: {value}",
                    "extra_info": {"input_name": name},
                }
            )
    result = (valid and not errors, errors)
    validated[node_id] = result
    return result


def _check_link(
    prompt: Mapping[str, Any],
    classes: Mapping[str, NodeClass],
    spec: InputSpec,
    link: list[Any],
    errors: list[Reason],
    validated: dict[str, tuple[bool, list[Reason]]],
    image_exists: ImageExists | None = None,
) -> bool:
    """Check one `[node_id, slot]` input; False when the linked node itself is invalid."""
    config = spec.wire()
    if len(link) != 2:
        errors.append(
            {
                "type": "bad_linked_input",
                "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                "details": spec.name,
                "extra_info": {
                    "input_name": spec.name,
                    "input_config": config,
                    "received_value": link,
                },
            }
        )
        return True
    source_id, slot = str(link[0]), link[1]
    try:
        source_class = classes[prompt[source_id]["class_type"]]
        received = source_class.return_types[slot]
    except (KeyError, IndexError, TypeError) as exc:
        raise _InnerValidationError(f"{exc!r}") from exc
    if received != spec.type_name:
        errors.append(
            {
                "type": "return_type_mismatch",
                "message": "Return type mismatch between linked nodes",
                "details": f"{spec.name}, received_type({received}) mismatch "
                f"input_type({spec.type_name})",
                "extra_info": {
                    "input_name": spec.name,
                    "input_config": config,
                    "received_type": received,
                    "linked_node": link,
                },
            }
        )
        return True
    try:
        source_valid, _ = _validate_node(prompt, classes, source_id, validated, image_exists)
    except Exception as exc:
        validated[source_id] = (
            False,
            [_exception_reason("exception_during_inner_validation", exc)],
        )
        return False
    return source_valid


def _check_value(spec: InputSpec, inputs: dict[str, Any]) -> Reason | None:
    """Coerce and range-check one widget value; the reason it fails, or None."""
    name = spec.name
    value = inputs[name]
    if isinstance(value, dict) and "__value__" in value:
        value = inputs[name] = value["__value__"]
    config = spec.wire()
    converters: dict[str, type] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
    convert = converters.get(spec.type_name)
    if convert is not None:
        try:
            value = inputs[name] = convert(value)
        except (TypeError, ValueError, OverflowError) as exc:
            return {
                "type": "invalid_input_type",
                "message": f"Failed to convert an input value to a {spec.type_name} value",
                "details": f"{name}, {value}, {exc}",
                "extra_info": {
                    "input_name": name,
                    "input_config": config,
                    "received_value": value,
                    "exception_message": str(exc),
                },
            }
    minimum, maximum = spec.options.get("min"), spec.options.get("max")
    if minimum is not None and value < minimum:
        return _range_reason(
            "value_smaller_than_min", f"smaller than min of {minimum}", spec, value
        )
    if maximum is not None and value > maximum:
        return _range_reason("value_bigger_than_max", f"bigger than max of {maximum}", spec, value)
    if isinstance(spec.type, tuple) and value not in spec.type:
        listed = len(spec.type) <= _MAX_LISTED_CHOICES
        choices = str(list(spec.type)) if listed else f"(list of length {len(spec.type)})"
        return {
            "type": "value_not_in_list",
            "message": "Value not in list",
            "details": f"{name}: {value!r} not in {choices}",
            "extra_info": {
                "input_name": name,
                "input_config": config if listed else None,
                "received_value": value,
            },
        }
    return None


def _range_reason(kind: str, text: str, spec: InputSpec, value: Any) -> Reason:
    return {
        "type": kind,
        "message": f"Value {value} {text}",
        "details": spec.name,
        "extra_info": {
            "input_name": spec.name,
            "input_config": spec.wire(),
            "received_value": value,
        },
    }
