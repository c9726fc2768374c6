"""The node classes the emulated ComfyUI knows (simulator layer).

Real class names and input specs of ComfyUI's built-in nodes (`nodes.py`), enough for the stock
text-to-image workflow, for `/object_info` and for prompt validation. What the nodes *do* lives in
`comfyui_exec`; this module is the static table only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF

SAMPLER_NAMES: tuple[str, ...] = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "gradient_estimation",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)
SCHEDULER_NAMES: tuple[str, ...] = (
    "normal",
    "karras",
    "exponential",
    "sgm_uniform",
    "simple",
    "ddim_uniform",
    "beta",
    "linear_quadratic",
    "kl_optimal",
)

# A combo input's type is its tuple of allowed values; every other type is a string.
InputType = str | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One input of a node class: its name, type and widget options (min, max, default...)."""

    name: str
    type: InputType
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        """The type as linked outputs name it: "COMBO" for a list of choices."""
        return "COMBO" if isinstance(self.type, tuple) else self.type

    def wire(self) -> list[Any]:
        """The `[type, options]` pair `/object_info` shows (a combo's type is its list)."""
        kind: Any = list(self.type) if isinstance(self.type, tuple) else self.type
        return [kind, dict(self.options)] if self.options else [kind]


@dataclass(frozen=True, slots=True)
class NodeClass:
    """One node class as ComfyUI registers it."""

    name: str
    display_name: str
    category: str
    required: tuple[InputSpec, ...]
    return_types: tuple[str, ...] = ()
    return_names: tuple[str, ...] | None = None
    hidden: Mapping[str, str] = field(default_factory=dict)
    output_node: bool = False
    description: str = ""

    def input(self, name: str) -> InputSpec | None:
        return next((spec for spec in self.required if spec.name == name), None)

    def object_info(self) -> dict[str, Any]:
        """This class as `GET /object_info` describes it."""
        inputs: dict[str, Any] = {"required": {spec.name: spec.wire() for spec in self.required}}
        order: dict[str, list[str]] = {"required": [spec.name for spec in self.required]}
        if self.hidden:
            inputs["hidden"] = dict(self.hidden)
            order["hidden"] = list(self.hidden)
        return {
            "input": inputs,
            "input_order": order,
            "output": list(self.return_types),
            "output_is_list": [False] * len(self.return_types),
            "output_name": list(self.return_names or self.return_types),
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": "nodes",
            "category": self.category,
            "output_node": self.output_node,
        }


def _int(default: int, minimum: int, maximum: int, step: int = 1, **extra: Any) -> dict[str, Any]:
    return {"default": default, "min": minimum, "max": maximum, "step": step, **extra}


_IMAGE_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def build_node_classes(checkpoint_filenames: Iterable[str]) -> dict[str, NodeClass]:
    """The class table, with `ckpt_name` choices taken from the installed checkpoints."""
    size = _int(512, 16, MAX_RESOLUTION, 8)
    classes = (
        NodeClass(
            name="CheckpointLoaderSimple",
            display_name="Load Checkpoint",
            category="loaders",
            required=(InputSpec("ckpt_name", tuple(checkpoint_filenames)),),
            return_types=("MODEL", "CLIP", "VAE"),
            description="Loads a diffusion model checkpoint.",
        ),
        NodeClass(
            name="CLIPTextEncode",
            display_name="CLIP Text Encode (Prompt)",
            category="conditioning",
            required=(
                InputSpec("text", "STRING", {"multiline": True, "dynamicPrompts": True}),
                InputSpec("clip", "CLIP"),
            ),
            return_types=("CONDITIONING",),
            description="Encodes a text prompt with a CLIP model.",
        ),
        NodeClass(
            name="EmptyLatentImage",
            display_name="Empty Latent Image",
            category="latent",
            required=(
                InputSpec("width", "INT", size),
                InputSpec("height", "INT", size),
                InputSpec("batch_size", "INT", _int(1, 1, 4096)),
            ),
            return_types=("LATENT",),
            description="Creates a batch of empty latent images to be denoised.",
        ),
        NodeClass(
            name="KSampler",
            display_name="KSampler",
            category="sampling",
            required=(
                InputSpec("model", "MODEL"),
                InputSpec("seed", "INT", _int(0, 0, MAX_SEED, control_after_generate=True)),
                InputSpec("steps", "INT", _int(20, 1, 10000)),
                InputSpec("cfg", "FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                InputSpec("sampler_name", SAMPLER_NAMES),
                InputSpec("scheduler", SCHEDULER_NAMES),
                InputSpec("positive", "CONDITIONING"),
                InputSpec("negative", "CONDITIONING"),
                InputSpec("latent_image", "LATENT"),
                InputSpec(
                    "denoise", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}
                ),
            ),
            return_types=("LATENT",),
            description="Denoises a latent image with the model and conditioning.",
        ),
        NodeClass(
            name="VAEDecode",
            display_name="VAE Decode",
            category="latent",
            required=(InputSpec("samples", "LATENT"), InputSpec("vae", "VAE")),
            return_types=("IMAGE",),
            description="Decodes latent images back into pixel space images.",
        ),
        NodeClass(
            name="SaveImage",
            display_name="Save Image",
            category="image",
            required=(
                InputSpec("images", "IMAGE"),
                InputSpec("filename_prefix", "STRING", {"default": "ComfyUI"}),
            ),
            hidden=_IMAGE_HIDDEN,
            output_node=True,
            description="Saves the input images to your ComfyUI output directory.",
        ),
        NodeClass(
            name="PreviewImage",
            display_name="Preview Image",
            category="image",
            required=(InputSpec("images", "IMAGE"),),
            hidden=_IMAGE_HIDDEN,
            output_node=True,
            description="Saves the input images to a temporary directory.",
        ),
        NodeClass(
            name="EmptyImage",
            display_name="EmptyImage",
            category="image",
            required=(
                InputSpec("width", "INT", _int(512, 1, MAX_RESOLUTION)),
                InputSpec("height", "INT", _int(512, 1, MAX_RESOLUTION)),
                InputSpec("batch_size", "INT", _int(1, 1, 4096)),
                InputSpec("color", "INT", _int(0, 0, 0xFFFFFF, display="color")),
            ),
            return_types=("IMAGE",),
        ),
    )
    return {node.name: node for node in classes}
