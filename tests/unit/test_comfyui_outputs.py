"""Output prefixes tagged with the prompt id, and the probes that find their files."""

from __future__ import annotations

from gpu_agent.comfyui_outputs import SavedImageProbe, tag_outputs
from gpu_agent.sim.workflows import SD15, text_to_image

PROMPT = "0f8fad5b-d9cb-469f-a165-70867728950e"


def test_each_save_node_writes_under_a_name_that_ends_with_the_prompt_id() -> None:
    workflow = text_to_image(SD15, width=512, height=512, prefix="studio/fox")
    workflow["10"] = {"class_type": "SaveImage",
                      "inputs": {"images": ["8", 0], "filename_prefix": "plain"}}  # fmt: skip
    tagged, probes = tag_outputs(workflow, PROMPT)
    assert tagged["9"]["inputs"]["filename_prefix"] == f"studio/fox_{PROMPT}"
    assert tagged["10"]["inputs"]["filename_prefix"] == f"plain_{PROMPT}"
    assert probes == (
        SavedImageProbe("9", "studio", f"fox_{PROMPT}"),
        SavedImageProbe("10", "", f"plain_{PROMPT}"),
    )
    assert probes[0].filename(1) == f"fox_{PROMPT}_00001_.png"
    # The caller's workflow is left as it was, and tagging is the same every time.
    assert workflow["9"]["inputs"]["filename_prefix"] == "studio/fox"
    assert tag_outputs(workflow, PROMPT) == (tagged, probes)


def test_a_prefix_comfyui_expands_is_left_alone_and_the_prompt_gets_no_probes() -> None:
    workflow = text_to_image(SD15, width=512, height=512, prefix="fox_%width%")
    tagged, probes = tag_outputs(workflow, PROMPT)
    assert tagged == workflow
    assert probes == ()
    linked = text_to_image(SD15, width=512, height=512)
    linked["9"]["inputs"]["filename_prefix"] = ["3", 0]
    assert tag_outputs(linked, PROMPT) == (linked, ())
