"""ComfyUI workflows in API format, as the studio's tools send them: shared by the controller's
studio workflows and the simulated desktop's demos, tests and benchmarks."""

from __future__ import annotations

from typing import Any

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"


def _sample_and_save(
    ckpt: str, *, text: str, seed: int, steps: int, denoise: float, latent: str, prefix: str
) -> dict[str, Any]:
    """The nodes both default graphs share: the checkpoint, the two prompts, the sampler on
    node `latent`'s latent, the VAE decode and SaveImage."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": denoise,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": [latent, 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def text_to_image(
    ckpt: str = SDXL,
    *,
    width: int = 1024,
    height: int = 1024,
    batch: int = 1,
    steps: int = 20,
    seed: int = 1,
    text: str = "a lighthouse at dusk, oil painting",
    prefix: str = "studio",
) -> dict[str, Any]:
    """ComfyUI's default text-to-image graph; node "6" holds the positive prompt."""
    latent = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": width, "height": height, "batch_size": batch},
    }
    nodes = _sample_and_save(
        ckpt, text=text, seed=seed, steps=steps, denoise=1.0, latent="5", prefix=prefix
    )
    return {"4": nodes.pop("4"), "6": nodes.pop("6"), "7": nodes.pop("7"), "5": latent, **nodes}


def blank_image(*, width: int = 512, height: int = 512, prefix: str = "blank") -> dict[str, Any]:
    """A graph with no model weights at all: EmptyImage straight into SaveImage."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def image_to_image(
    ckpt: str = SD15,
    *,
    image: str = "input.png",
    width: int = 512,
    height: int = 512,
    steps: int = 20,
    denoise: float = 0.6,
    seed: int = 1,
    text: str = "the same scene as an oil painting",
    prefix: str = "img2img",
) -> dict[str, Any]:
    """ComfyUI's img2img graph: LoadImage, scaled to the model's size, VAE-encoded and sampled
    at `denoise`. `image` is the name the picture is uploaded under."""
    loaded = {
        "10": {"class_type": "LoadImage", "inputs": {"image": image}},
        "11": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["10", 0],
                "upscale_method": "lanczos",
                "width": width,
                "height": height,
                "crop": "center",
            },
        },
    }
    nodes = _sample_and_save(
        ckpt, text=text, seed=seed, steps=steps, denoise=denoise, latent="12", prefix=prefix
    )
    encode = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    return {**loaded, "4": nodes.pop("4"), "12": encode, **nodes}
