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
    python_module: str = "nodes"
    # Inputs the class checks itself (ComfyUI's VALIDATE_INPUTS): no list check for them.
    validated_inputs: tuple[str, ...] = ()

    def input(self, name: str) -> InputSpec | None:
        """The required input called `name`; None when the class has none of that name."""
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
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }


def _int(default: int, minimum: int, maximum: int, step: int = 1, **extra: Any) -> dict[str, Any]:
    return {"default": default, "min": minimum, "max": maximum, "step": step, **extra}


_IMAGE_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")
# LoadImageMask's channel choices, and ImageToMask's (in ComfyUI's own orders).
MASK_CHANNELS = ("alpha", "red", "green", "blue")
IMAGE_CHANNELS = ("red", "green", "blue", "alpha")
# Extensions ComfyUI's LoadImage lists (files whose guessed media type is an image).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def build_node_classes(
    checkpoint_filenames: Iterable[str], input_files: Iterable[str] = ()
) -> dict[str, NodeClass]:
    """The class table, with `ckpt_name` choices taken from the installed checkpoints and the
    image loaders' choices from the files at the top of the input folder."""
    size = _int(512, 16, MAX_RESOLUTION, 8)
    files = tuple(sorted(input_files))
    images = tuple(f for f in files if any(f.lower().endswith(e) for e in IMAGE_EXTENSIONS))
    upload = {"image_upload": True}
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
        NodeClass(
            name="LoadImage",
            display_name="Load Image",
            category="image",
            required=(InputSpec("image", images, upload),),
            return_types=("IMAGE", "MASK"),
            validated_inputs=("image",),
        ),
        NodeClass(
            name="LoadImageMask",
            display_name="Load Image (as Mask)",
            category="mask",
            required=(InputSpec("image", files, upload), InputSpec("channel", MASK_CHANNELS)),
            return_types=("MASK",),
            validated_inputs=("image",),
        ),
        NodeClass(
            name="VAEEncode",
            display_name="VAE Encode",
            category="latent",
            required=(InputSpec("pixels", "IMAGE"), InputSpec("vae", "VAE")),
            return_types=("LATENT",),
            description="Encodes pixel space images into latent space images.",
        ),
        NodeClass(
            name="ImageScale",
            display_name="Upscale Image",
            category="image/upscaling",
            required=(
                InputSpec("image", "IMAGE"),
                InputSpec("upscale_method", UPSCALE_METHODS),
                InputSpec("width", "INT", _int(512, 0, MAX_RESOLUTION)),
                InputSpec("height", "INT", _int(512, 0, MAX_RESOLUTION)),
                InputSpec("crop", CROP_METHODS),
            ),
            return_types=("IMAGE",),
        ),
        NodeClass(
            name="ImageInvert",
            display_name="Invert Image",
            category="image",
            required=(InputSpec("image", "IMAGE"),),
            return_types=("IMAGE",),
        ),
        NodeClass(
            name="ImageBlur",
            display_name="Image Blur",
            category="image/postprocessing",
            required=(
                InputSpec("image", "IMAGE"),
                InputSpec("blur_radius", "INT", _int(1, 1, 31)),
                InputSpec("sigma", "FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
            ),
            return_types=("IMAGE",),
            python_module="comfy_extras.nodes_post_processing",
        ),
        NodeClass(
            name="ImageToMask",
            display_name="Convert Image to Mask",
            category="mask",
            required=(InputSpec("image", "IMAGE"), InputSpec("channel", IMAGE_CHANNELS)),
            return_types=("MASK",),
            python_module="comfy_extras.nodes_mask",
        ),
        NodeClass(
            name="MaskToImage",
            display_name="Convert Mask to Image",
            category="mask",
            required=(InputSpec("mask", "MASK"),),
            return_types=("IMAGE",),
            python_module="comfy_extras.nodes_mask",
        ),
        NodeClass(
            name="SaveImageWebsocket",
            display_name="SaveImageWebsocket",
            category="api/image",
            required=(InputSpec("images", "IMAGE"),),
            output_node=True,
            python_module="custom_nodes.websocket_image_save",
        ),
    )
    return {node.name: node for node in classes}
