"""Reading what an image job will need from its ComfyUI workflow (pure core)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controller.domain.footprints import ImageKey

_LOADERS = {"CheckpointLoaderSimple", "CheckpointLoader", "UNETLoader"}
_LATENTS = {"EmptyLatentImage", "EmptySD3LatentImage"}


def checkpoint_family(filename: str) -> str:
    """A checkpoint's model family from its file name (the convention the hubs follow)."""
    name = filename.lower()
    if "flux" in name:
        return "flux"
    if "xl" in name or "sdxl" in name or "pony" in name:
        return "sdxl"
    return "sd15"


def _int_input(inputs: Mapping[str, Any], name: str, default: int) -> int:
    value = inputs.get(name, default)
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    )


def image_key(workflow: Mapping[str, Any]) -> ImageKey:
    """Family, size and batch of a workflow. Without a checkpoint loader it needs no weights
    ("none"); without a latent node it is taken at 1024x1024, batch 1."""
    family = "none"
    width, height, batch = 1024, 1024, 1
    for node in workflow.values():
        if not isinstance(node, Mapping):
            continue
        cls = node.get("class_type")
        inputs = node.get("inputs")
        # A node a caller got wrong (a class_type that is no string) sizes nothing here.
        if not isinstance(cls, str) or not isinstance(inputs, Mapping):
            continue
        if cls in _LOADERS:
            name = inputs.get("ckpt_name") or inputs.get("unet_name")
            if isinstance(name, str):
                family = checkpoint_family(name)
        elif cls in _LATENTS:
            width = _int_input(inputs, "width", width)
            height = _int_input(inputs, "height", height)
            batch = _int_input(inputs, "batch_size", batch)
    return ImageKey(family, width, height, batch)
