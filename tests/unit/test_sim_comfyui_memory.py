"""The emulated ComfyUI's load decision (`place`) on plain numbers."""

from __future__ import annotations

from typing import Any

from gpu_agent.sim.catalog import FLUX, MIB, SDXL
from gpu_agent.sim.comfyui_memory import MIN_VAE_TILE_BYTES, Placement, place

RESERVE = 400 * MIB
# 12282 MiB card, 600 MiB desktop, 400 MiB CUDA context.
FREE_ALONE = (12282 - 600 - 400) * MIB


def unet(**overrides: Any) -> Placement:
    args: dict[str, Any] = {
        "part": "unet",
        "part_bytes": SDXL.unet_bytes,
        "resident_bytes": 0,
        "activation_bytes": SDXL.sampler_activation_bytes,
        "reserve_bytes": RESERVE,
        "free_bytes": FREE_ALONE,
        "others": [],
        "sheddable": [],
        "min_resident_bytes": SDXL.min_resident_bytes,
    }
    args.update(overrides)
    return place(**args)


def test_loads_fully_when_it_fits() -> None:
    decision = unet()
    assert decision.mode == "full"
    assert decision.resident_bytes == SDXL.unet_bytes
    assert (decision.evict, decision.shed) == ((), ())


def test_evicts_least_recently_used_checkpoints_only_as_far_as_needed() -> None:
    others = [("old.safetensors", 3000 * MIB), ("newer.safetensors", 3000 * MIB)]
    decision = unet(free_bytes=4000 * MIB, others=others)
    assert decision.mode == "full"
    assert decision.evict == ("old.safetensors",)


def test_sheds_its_own_clip_before_going_low_vram() -> None:
    decision = unet(free_bytes=5000 * MIB, sheddable=[("clip", SDXL.clip_bytes)])
    assert decision.mode == "full"
    assert decision.shed == (("clip", SDXL.clip_bytes),)


def test_low_vram_keeps_what_fits_after_activations_and_reserve() -> None:
    free = (12282 - 600 - 5 * 1024 - 400) * MIB
    decision = unet(free_bytes=free)
    assert decision.mode == "lowvram"
    assert decision.resident_bytes == free - SDXL.sampler_activation_bytes - RESERVE
    assert 0 < decision.resident_bytes < SDXL.unet_bytes


def test_out_of_memory_below_the_minimum_resident_share() -> None:
    decision = unet(free_bytes=(12282 - 600 - 10 * 1024 - 400) * MIB)
    assert decision.mode == "oom"
    assert "out of memory" in decision.reason


def test_flux_never_fits_fully() -> None:
    decision = unet(
        part_bytes=FLUX.unet_bytes,
        activation_bytes=FLUX.sampler_activation_bytes,
        min_resident_bytes=FLUX.min_resident_bytes,
    )
    assert decision.mode == "lowvram"
    assert decision.resident_bytes + FLUX.sampler_activation_bytes + RESERVE == FREE_ALONE


def test_vae_sheds_part_of_the_unet_then_tiles() -> None:
    shed = place(
        part="vae",
        part_bytes=SDXL.vae_bytes,
        resident_bytes=0,
        activation_bytes=SDXL.vae_activation_bytes,
        reserve_bytes=RESERVE,
        free_bytes=1000 * MIB,
        others=[],
        sheddable=[("unet", SDXL.unet_bytes)],
        min_resident_bytes=0,
    )
    assert shed.mode == "full"
    [(part, nbytes)] = shed.shed
    assert part == "unet"
    assert nbytes == SDXL.vae_bytes + SDXL.vae_activation_bytes + RESERVE - 1000 * MIB
    tiled = place(
        part="vae",
        part_bytes=SDXL.vae_bytes,
        resident_bytes=0,
        activation_bytes=SDXL.vae_activation_bytes,
        reserve_bytes=RESERVE,
        free_bytes=1000 * MIB,
        others=[],
        sheddable=[],
        min_resident_bytes=0,
    )
    assert tiled.mode == "tiled"
    assert MIN_VAE_TILE_BYTES <= tiled.activation_bytes < SDXL.vae_activation_bytes
