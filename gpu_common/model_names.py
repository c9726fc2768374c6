"""Ollama's model-name rules, shared by the agent and the simulated Ollama."""

from __future__ import annotations


def normalize_model_name(name: str) -> str:
    """`llama3.2` -> `llama3.2:latest`; names with a tag are kept."""
    name = name.strip()
    if not name:
        return name
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"
