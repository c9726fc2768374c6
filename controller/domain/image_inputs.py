"""A job's input pictures and its workflow (pure core): which nodes load them, and the workflow
as it must reach ComfyUI once they are uploaded.

A studio tool names an input picture by the value of a loader node's `image` input (LoadImage,
LoadImageMask), e.g. `"image": "sketch.png"`, and uploads the picture under that name. ComfyUI
keeps uploads under names of its own choosing (a clash gets `name (1).png`), so at dispatch the
workflow is rewritten: every loader that names an input gets the name ComfyUI answered.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

# Nodes whose `image` input names a picture in ComfyUI's input folder.
IMAGE_LOADERS = frozenset({"LoadImage", "LoadImageMask"})
# The folder under ComfyUI's input folder where the controller's uploads go.
UPLOAD_SUBFOLDER = "gpu-controller"

InputKind = Literal["image", "mask"]


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One input as a job declares it: its name in the workflow, whether it is a mask, and
    for a mask the input it is painted onto (ComfyUI's `/upload/mask`), if any."""

    name: str
    kind: InputKind = "image"
    mask_of: str | None = None


def loader_references(workflow: Mapping[str, Any]) -> dict[str, list[str]]:
    """Which loader nodes name each picture: file name -> node ids, in workflow order."""
    references: dict[str, list[str]] = {}
    for node_id, node in workflow.items():
        if not isinstance(node, Mapping) or node.get("class_type") not in IMAGE_LOADERS:
            continue
        inputs = node.get("inputs")
        value = inputs.get("image") if isinstance(inputs, Mapping) else None
        if isinstance(value, str):
            references.setdefault(value, []).append(str(node_id))
    return references


def input_problems(workflow: Mapping[str, Any], inputs: Collection[InputSpec]) -> list[str]:
    """Why `inputs` do not fit `workflow`, one line each; empty when they do.

    Every input must be named by a loader node (or be the original a mask is painted onto,
    whose composite the loader names); names are unique; a mask's original is an image input.
    """
    problems: list[str] = []
    references = loader_references(workflow)
    by_name: dict[str, InputSpec] = {}
    for spec in inputs:
        if spec.name in by_name:
            problems.append(f"input {spec.name!r} is given twice")
        by_name[spec.name] = spec
    originals = {spec.mask_of for spec in inputs if spec.mask_of is not None}
    for spec in inputs:
        if spec.mask_of is not None:
            original = by_name.get(spec.mask_of)
            if original is None or original.kind != "image":
                problems.append(
                    f"mask {spec.name!r} goes onto {spec.mask_of!r}, which is no image input"
                )
            if spec.kind != "mask":
                problems.append(f"input {spec.name!r} names an original but is no mask")
        if spec.name not in references and spec.name not in originals:
            problems.append(
                f"input {spec.name!r} is not named by the image input of any "
                f"{' or '.join(sorted(IMAGE_LOADERS))} node"
            )
    return problems


def rewrite_inputs(workflow: Mapping[str, Any], uploaded: Mapping[str, str]) -> dict[str, Any]:
    """A copy of `workflow` whose loader nodes name the uploaded files: each loader's `image`
    that is a key of `uploaded` becomes its value (ComfyUI's annotated file name)."""
    rewritten: dict[str, Any] = dict(workflow)
    for name, node_ids in loader_references(workflow).items():
        if name in uploaded:
            for node_id in node_ids:
                # Only the nodes that change are copied; the caller's workflow stays as it is.
                node = dict(rewritten[node_id])
                node["inputs"] = {**node["inputs"], "image": uploaded[name]}
                rewritten[node_id] = node
    return rewritten


def upload_name(sha256: str, extension: str, onto_sha256: str | None = None) -> str:
    """The file name an input is uploaded under: from its content (and for a mask, its
    original's), so the same picture keeps one name and ComfyUI's hash check finds it again."""
    if onto_sha256 is None:
        return f"{sha256[:32]}{extension}"
    # The composite ComfyUI writes for a mask is a PNG of the original with the mask's alpha.
    return f"{sha256[:16]}{onto_sha256[:16]}-mask.png"
