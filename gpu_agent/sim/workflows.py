"""ComfyUI workflows in API format, as the studio's tools send them (demo, tests, benchmarks);
the graphs live in `gpu_common.workflows`, shared with the controller."""

from __future__ import annotations

from gpu_common.workflows import SD15, SDXL, blank_image, image_to_image, text_to_image

__all__ = ["SD15", "SDXL", "blank_image", "image_to_image", "text_to_image"]
