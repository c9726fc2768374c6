"""Embedding models in the policy core: the intents never pick them, generate and chat never
reach them, and an embedding request names its model."""

from __future__ import annotations

from controller.domain.catalog import is_embedding_model
from controller.domain.selection import Choice, NoChoice, quality_tier, select
from controller.domain.types import LlmRequest, ModelProfile

from .policy_fixtures import CATALOG, MIB, desktop

NOW = 1000.0
# nomic-embed-text as the catalogue believes it: tiny, and very fast at reading its input, so
# without the rule "auto:fast" would take it for a chat model.
NOMIC = ModelProfile(
    "nomic-embed-text:latest", 33.0, 353 * MIB, 353 * MIB, 1000.0, 30000.0, 0.6, embedding=True
)
BGE = ModelProfile("bge-m3:latest", 37.0, 1300 * MIB, 1300 * MIB, 1000.0, 10000.0, 0.9, True, True)
WITH_EMBEDDINGS = {**CATALOG, NOMIC.name: NOMIC, BGE.name: BGE}


def test_intents_choose_among_chat_models_only() -> None:
    agent = desktop()
    for intent in ("auto", "auto:fast", "auto:quality"):
        choice = select(LlmRequest(intent, prompt_tokens=20), [agent], WITH_EMBEDDINGS, NOW)
        assert isinstance(choice, Choice), choice
        assert choice.model in CATALOG, (intent, choice.model)
        alone = select(LlmRequest(intent, prompt_tokens=20), [agent], CATALOG, NOW)
        assert isinstance(alone, Choice)
        assert choice.model == alone.model
    # The quality tier is the chat models' own: embedding models do not pull it down.
    chat_only = {name: p for name, p in WITH_EMBEDDINGS.items() if not p.embedding}
    assert quality_tier(chat_only, [agent]) == quality_tier(CATALOG, [agent])


def test_generate_or_chat_on_an_embedding_model_is_refused_in_ollamas_words() -> None:
    for task in ("generate", "chat"):
        refused = select(
            LlmRequest(NOMIC.name, prompt_tokens=20, task=task), [desktop()], WITH_EMBEDDINGS, NOW
        )
        assert isinstance(refused, NoChoice)
        assert refused.kind == "unsupported"
        assert refused.reason == f'"{NOMIC.name}" does not support {task}'


def test_an_embedding_request_names_its_model() -> None:
    refused = select(
        LlmRequest("auto", prompt_tokens=20, task="embed"), [desktop()], WITH_EMBEDDINGS, NOW
    )
    assert isinstance(refused, NoChoice)
    assert refused.kind == "unsupported"
    assert "must name its embedding model" in refused.reason
    assert "bge-m3:latest, nomic-embed-text:latest" in refused.reason

    chosen = select(
        LlmRequest(NOMIC.name, prompt_tokens=20, task="embed"), [desktop()], WITH_EMBEDDINGS, NOW
    )
    assert isinstance(chosen, Choice)
    assert chosen.model == NOMIC.name
    assert chosen.load
    # No output tokens: the estimate is the load and reading the input.
    assert chosen.expected_latency_s < NOMIC.load_s + 0.1
    # Ollama embeds with any model, so a chat model may be named for embeddings too.
    chat = select(
        LlmRequest("llama3.2:3b", prompt_tokens=20, task="embed"), [desktop()], CATALOG, NOW
    )
    assert isinstance(chat, Choice)


def test_unknown_models_are_unknown_whatever_the_task() -> None:
    for task in ("generate", "embed"):
        unknown = select(
            LlmRequest("nope:1b", prompt_tokens=5, task=task), [desktop()], WITH_EMBEDDINGS, NOW
        )
        assert isinstance(unknown, NoChoice)
        assert unknown.kind == "unknown"
        assert unknown.retry_after_s == 0


def test_embedding_models_are_told_by_capabilities_or_family() -> None:
    assert is_embedding_model(["embedding"], "nomic-bert")
    assert not is_embedding_model(["completion", "tools"], "llama")
    # A model that both completes and embeds is a chat model to the intents.
    assert not is_embedding_model(["completion", "embedding"], "qwen3")
    # An Ollama before 0.12 lists no capabilities: the family says it.
    assert is_embedding_model(None, "bert")
    assert not is_embedding_model(None, "qwen2")
