"""Output files as the durable trace of a prompt (pure; no I/O).

ComfyUI forgets its queue and history when it restarts, so a prompt that finished while nobody
was listening (the agent restarting, the websocket silent) and before such a restart leaves no
record, and running it again would make its pictures twice. Its pictures stay on disk, though.
The agent gives each `SaveImage` node of a prompt a filename prefix that ends with the prompt
id, so the first file each writes has a name known in advance (`<prefix>_<id>_00001_.png`,
ComfyUI's own numbering); finding every one of them with `/view` proves the prompt ran to its
end, and what it saved is then its outputs.

A prefix with `%...%` tokens (which ComfyUI expands when it saves) cannot be predicted and is
left alone; a prompt with such a node has no probes, and its outcome can only come from
ComfyUI's history, as before.
"""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SAVE_NODE = "SaveImage"
# The most files of one node looked for when collecting a found prompt's outputs (its batch).
MAX_FILES_PER_NODE = 64


@dataclass(frozen=True, slots=True)
class SavedImageProbe:
    """Where the files of one `SaveImage` node go: ComfyUI's `subfolder` of its output folder
    and the file `stem` that its counter follows."""

    node_id: str
    subfolder: str
    stem: str

    def filename(self, counter: int) -> str:
        """ComfyUI's name for the node's `counter`-th file (counting from 1)."""
        return f"{self.stem}_{counter:05}_.png"


def tag_outputs(
    workflow: Mapping[str, Any], prompt_id: str
) -> tuple[dict[str, Any], tuple[SavedImageProbe, ...]]:
    """`workflow` with its `SaveImage` prefixes ending in `prompt_id`, and the probes that find
    their files; no probes when some `SaveImage` node's files cannot be predicted."""
    tagged = copy.deepcopy(dict(workflow))
    probes: list[SavedImageProbe] = []
    for node_id, node in tagged.items():
        if not isinstance(node, dict) or node.get("class_type") != SAVE_NODE:
            continue
        inputs = node.get("inputs")
        prefix = inputs.get("filename_prefix") if isinstance(inputs, dict) else None
        if not isinstance(prefix, str) or not prefix or "%" in prefix:
            return dict(workflow), ()
        subfolder, name = posixpath.split(posixpath.normpath(prefix.replace("\\", "/")))
        stem = f"{name}_{prompt_id}"
        assert isinstance(inputs, dict)
        inputs["filename_prefix"] = posixpath.join(subfolder, stem) if subfolder else stem
        probes.append(SavedImageProbe(str(node_id), subfolder, stem))
    return tagged, tuple(probes)
