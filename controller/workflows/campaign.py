"""The studio's campaign as a workflow DAG (data): used by the demo, the benchmark and tests.

A strategist's brief, two copy variants drafted from it, an SDXL image rendered from each
variant, and a review of the lot: six nodes in four levels.
"""

from __future__ import annotations

from typing import Any

from gpu_common.workflows import SDXL, text_to_image


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
                        "workflow": text_to_image(
                            SDXL, seed=seed + i, steps=steps, text="", prefix="ad"
                        ),
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
