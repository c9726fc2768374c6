"""Input pictures: their headers read from the first bytes, and how they fit a workflow."""

from __future__ import annotations

import struct

import pytest

from controller.domain.image_inputs import (
    InputSpec,
    input_problems,
    loader_references,
    rewrite_inputs,
    upload_name,
)
from controller.domain.workflows import image_key
from gpu_agent.sim.png import encode_png, gradient_rows, solid_rows, with_alpha
from gpu_agent.sim.workflows import SD15, image_to_image
from gpu_common.image_files import NotAnImage, probe_image
from gpu_common.schema import UploadResult


def jpeg(width: int, height: int) -> bytes:
    """SOI, an APP0 segment, then a baseline frame header (what the probe reads)."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x00" * 9
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


def riff(chunk: bytes, payload: bytes) -> bytes:
    body = b"WEBP" + chunk + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_png_size_and_alpha() -> None:
    rgb = encode_png(7, 5, solid_rows(7, 5, (1, 2, 3)))
    rgba = encode_png(7, 5, with_alpha(gradient_rows(7, 5, 1), (b"\x80" * 7 for _ in range(5))),
                      alpha=True)  # fmt: skip
    header = probe_image(rgb)
    assert (header.format, header.width, header.height, header.has_alpha) == ("png", 7, 5, False)
    assert probe_image(rgba).has_alpha
    assert header.media_type == "image/png"
    assert header.extension == ".png"


def test_jpeg_size_from_its_frame_header() -> None:
    header = probe_image(jpeg(1920, 1080))
    assert (header.format, header.width, header.height, header.has_alpha) == (
        "jpeg",
        1920,
        1080,
        False,
    )


def test_webp_lossy_lossless_and_extended_headers() -> None:
    lossy = riff(b"VP8 ", b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", 640, 480) + b"\x00" * 4)
    bits = (300 - 1) | ((200 - 1) << 14) | (1 << 28)
    lossless = riff(b"VP8L", b"\x2f" + struct.pack("<I", bits))
    extended = riff(b"VP8X", bytes([0x10, 0, 0, 0]) + (4095).to_bytes(3, "little") * 2)
    assert (probe_image(lossy).width, probe_image(lossy).height) == (640, 480)
    assert (probe_image(lossless).width, probe_image(lossless).height) == (300, 200)
    assert probe_image(lossless).has_alpha
    assert (probe_image(extended).width, probe_image(extended).has_alpha) == (4096, True)


@pytest.mark.parametrize(
    "data",
    [b"", b"GIF89a" + b"\x00" * 20, b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, b"\xff\xd8\xff\xd9"],
    ids=["empty", "gif", "png_without_ihdr", "jpeg_without_frame"],
)
def test_anything_else_is_not_an_image(data: bytes) -> None:
    with pytest.raises(NotAnImage):
        probe_image(data)


def test_every_input_must_be_loaded_by_a_node_or_carry_a_mask() -> None:
    workflow = image_to_image(image="photo-mask.png")
    assert loader_references(workflow) == {"photo-mask.png": ["10"]}
    ok = [InputSpec("photo.png"), InputSpec("photo-mask.png", "mask", "photo.png")]
    assert input_problems(workflow, ok) == []
    problems = input_problems(
        workflow,
        [
            InputSpec("stray.png"),
            InputSpec("photo-mask.png", "mask", "nobody.png"),
            InputSpec("photo-mask.png", "mask"),
        ],
    )
    assert problems == [
        "input 'photo-mask.png' is given twice",
        "input 'stray.png' is not named by the image input of any LoadImage or LoadImageMask node",
        "mask 'photo-mask.png' goes onto 'nobody.png', which is no image input",
    ]


def test_the_workflow_names_what_comfyui_stored_and_the_callers_copy_stays() -> None:
    workflow = image_to_image(image="in.png")
    stored = UploadResult(name="abc (1).png", subfolder="gpu-controller", type="input")
    rewritten = rewrite_inputs(workflow, {"in.png": stored.reference()})
    assert rewritten["10"]["inputs"]["image"] == "gpu-controller/abc (1).png"
    assert workflow["10"]["inputs"]["image"] == "in.png"
    assert rewritten["4"] is workflow["4"]
    temp = UploadResult(name="x.png", subfolder="", type="temp")
    assert temp.reference() == "x.png [temp]"


def test_upload_names_come_from_the_content() -> None:
    assert upload_name("ab" * 32, ".jpg") == "ab" * 16 + ".jpg"
    assert upload_name("ab" * 32, ".png", "cd" * 32) == "ab" * 8 + "cd" * 8 + "-mask.png"


def test_an_img2img_job_is_sized_by_the_scale_before_its_vae_encode() -> None:
    key = image_key(image_to_image(SD15, image="in.png", width=640, height=448))
    assert (key.family, key.width, key.height, key.batch) == ("sd15", 640, 448, 1)
    # One side left to the picture: the size is not known before the picture is read.
    unknown = image_to_image(SD15, image="in.png", width=0, height=448)
    assert (image_key(unknown).width, image_key(unknown).height) == (1024, 1024)
