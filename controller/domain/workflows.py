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
    ("none"). Without a latent node, an img2img graph is sized by the ImageScale that feeds its
    VAEEncode (when it names both sides); otherwise it is taken at 1024x1024, batch 1."""
    family = "none"
    width, height, batch = 1024, 1024, 1
    has_latent = False
    scaled: tuple[int, int] | None = None
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
            has_latent = True
            width = _int_input(inputs, "width", width)
            height = _int_input(inputs, "height", height)
            batch = _int_input(inputs, "batch_size", batch)
        elif cls == "VAEEncode":
            scaled = scaled or _scaled_pixels(workflow, inputs.get("pixels"))
    if not has_latent and scaled is not None:
        width, height = scaled
    return ImageKey(family, width, height, batch)


def _scaled_pixels(workflow: Mapping[str, Any], link: Any) -> tuple[int, int] | None:
    """The size an ImageScale linked as `link` gives its pictures, when it names both sides."""
    if not (isinstance(link, list) and len(link) == 2):
        return None
    node = workflow.get(str(link[0]))
    if not isinstance(node, Mapping) or node.get("class_type") != "ImageScale":
        return None
    inputs = node.get("inputs")
    if not isinstance(inputs, Mapping):
        return None
    width, height = _int_input(inputs, "width", 0), _int_input(inputs, "height", 0)
    return (width, height) if width and height else None
