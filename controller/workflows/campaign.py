"""The studio's campaign as a workflow DAG (data): used by the demo, the benchmark and tests.

A strategist's brief, two copy variants drafted from it, an SDXL image rendered from each
variant, and a review of the lot: six nodes in four levels.
"""

from __future__ import annotations

from typing import Any

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"


def text_to_image(*, seed: int = 1, steps: int = 20, text: str = "") -> dict[str, Any]:
    """ComfyUI's default text-to-image graph (API format) for SDXL at 1024x1024; node "6"
    holds the positive prompt."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CHECKPOINT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 1024, "height": 1024, "batch_size": 1},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ad"}},
    }


def campaign_dag(*, seed: int = 1, steps: int = 20, product: str = "oat milk") -> dict[str, Any]:
    """brief -> copy_a, copy_b -> image_a, image_b -> review. `steps` sets the images'
    sampler steps (20 take about 5 s on the card)."""
    variants = ("a", "b")
    return {
        "nodes": [
            {
                "id": "brief",
                "agent_name": "llm",
                "input_data": {
                    "model": "auto:quality",
                    "prompt": f"Write a one-paragraph brief for a spring campaign for {product}.",
                },
            },
            *(
                {
                    "id": f"copy_{v}",
                    "agent_name": "llm",
                    "input_data": {
                        "model": "auto:fast",
                        "prompt": f"Write headline variant {v} for this brief: {{brief}}",
                    },
                    "depends_on": ["brief"],
                }
                for v in variants
            ),
            *(
                {
                    "id": f"image_{v}",
                    "agent_name": "image",
                    "input_data": {
                        "workflow": text_to_image(seed=seed + i, steps=steps),
                        "inputs": {"6.text": f"{{copy_{v}}}"},
                    },
                    "depends_on": [f"copy_{v}"],
                }
                for i, v in enumerate(variants)
            ),
            {
                "id": "review",
                "agent_name": "llm",
                "input_data": {
                    "model": "auto:quality",
                    "prompt": (
                        "Review the campaign. Copy A: {copy_a} Copy B: {copy_b} "
                        "Images: {image_a.outputs} {image_b.outputs}"
                    ),
                },
                "depends_on": ["copy_a", "copy_b", "image_a", "image_b"],
            },
        ]
    }
