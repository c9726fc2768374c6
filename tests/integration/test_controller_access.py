"""Who may use the controller: named client tokens, trusted networks, and counts per client.

The controller listens on 127.0.0.1 and trusts 127.0.0.2/32; clients bind distinct loopback
source addresses (127.0.0.2 trusted, 127.0.0.3 not), so the peer address the controller sees
is the one a studio machine would have. The official `ollama` client without any token (as the
`ollama` command line must run) works from the trusted address and is refused from the other;
everything that changes state still needs a token, from anywhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.settings import ClientToken, ControllerSettings
from gpu_agent.sim.desktop import SimDesktop
from tests.integration.stack import HTTP_TIMEOUT_S, Stack, running_stack, sd15

TRUSTED = "127.0.0.2"
UNTRUSTED = "127.0.0.3"
N8N_TOKEN = "n8n-t0ken-of-its-own"
SMALL = "llama3.2:3b"


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    token_file = tmp_path / "krita.token"
    token_file.write_text("krita-t0ken\n")
    clients = [
        ClientToken(name="n8n", token=N8N_TOKEN),
        ClientToken(name="krita", token_file=token_file),
    ]
    async with running_stack(
        desktop, tmp_path / "controller", clients=clients, trusted_networks=[f"{TRUSTED}/32"]
    ) as running:
        yield running


def client_from(stack: Stack, source: str, **headers: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    return httpx.AsyncClient(
        base_url=stack.url,
        transport=transport,
        headers=headers,
        timeout=HTTP_TIMEOUT_S,
        trust_env=False,
    )


def ollama_from(stack: Stack, source: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(
        host=stack.url, transport=httpx.AsyncHTTPTransport(local_address=source)
    )


async def requests_per_client(stack: Stack) -> dict[str, float]:
    text = (await stack.http.get("/metrics")).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "gpu_controller_client_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["client"]] = sample.value
    return counts


async def test_the_ollama_client_without_a_token_works_from_a_trusted_network(
    stack: Stack,
) -> None:
    trusted = ollama_from(stack, TRUSTED)
    listed = await trusted.list()
    assert "auto:quality" in [m.model for m in listed.models]
    shown = await trusted.show("auto:quality")
    assert shown.details is not None
    answer = await trusted.generate(model="auto:fast", prompt="hello", options={"num_predict": 8})
    assert answer.response
    chunks = [c async for c in await trusted.chat(
        model="auto:fast", messages=[{"role": "user", "content": "hi"}], stream=True,
        options={"num_predict": 8},
    )]  # fmt: skip
    assert chunks[-1].done
    # The same client from an address outside the trusted networks: refused.
    with pytest.raises(ollama.ResponseError) as refused:
        await ollama_from(stack, UNTRUSTED).list()
    assert refused.value.status_code == 401


async def test_what_changes_state_needs_a_token_even_from_a_trusted_network(
    stack: Stack,
) -> None:
    body = {"workflow": sd15(steps=2)}
    async with client_from(stack, TRUSTED) as trusted:
        assert (await trusted.head("/")).status_code == 200
        assert (await trusted.post("/v1/images", json=body)).status_code == 401
        missing = "/v1/images/00000000-0000-4000-8000-000000000000"
        assert (await trusted.delete(missing)).status_code == 401
        assert (await trusted.get("/v1/fleet")).status_code == 401
        assert (await trusted.get("/metrics")).status_code == 401
        assert (await trusted.post("/api/pull", json={"model": SMALL})).status_code == 401
        assert (await trusted.post("/api/delete", json={"model": SMALL})).status_code == 401
        # An OpenAI client always sends some key: on an LLM route it is let through as trusted.
        keyed = await trusted.get("/api/tags", headers={"Authorization": "Bearer sk-anything"})
        assert keyed.status_code == 200
    async with client_from(stack, TRUSTED, Authorization=f"Bearer {N8N_TOKEN}") as n8n:
        assert (await n8n.post("/v1/images", json=body)).status_code == 202


async def test_each_named_client_has_its_own_token_and_its_own_count(stack: Stack) -> None:
    async with (
        client_from(stack, UNTRUSTED, Authorization=f"Bearer {N8N_TOKEN}") as n8n,
        client_from(stack, UNTRUSTED, Authorization="Bearer krita-t0ken") as krita,
        client_from(stack, UNTRUSTED, Authorization="Bearer not-a-t0ken") as stranger,
        client_from(stack, TRUSTED) as trusted,
    ):
        for _ in range(3):
            assert (await n8n.get("/api/tags")).status_code == 200
        assert (await krita.get("/v1/fleet")).status_code == 200
        assert (await stranger.get("/api/tags")).status_code == 401
        assert (await trusted.get("/api/version")).status_code == 200
        assert (await trusted.get("/healthz")).status_code == 200
    counts = await requests_per_client(stack)
    assert counts["n8n"] == 3
    assert counts["krita"] == 1
    assert counts["trusted"] == 1
    assert counts["rejected"] == 1
    # The stack's own client (the controller's token) counts as "default", this scrape too.
    assert counts["default"] >= 1


def test_client_tokens_and_trusted_networks_are_checked(tmp_path: Path) -> None:
    base: dict[str, Any] = {"data_dir": tmp_path, "token": "main-t0ken"}
    with pytest.raises(ValueError, match="prefix length"):
        ControllerSettings(**base, trusted_networks=["192.168.1.7"])
    with pytest.raises(ValueError, match="not a network"):
        ControllerSettings(**base, trusted_networks=["192.168.1.7/24"])
    with pytest.raises(ValueError, match="exactly one of token and token_file"):
        ClientToken(name="n8n")
    same = [ClientToken(name="a", token="t0k"), ClientToken(name="b", token="t0k")]
    with pytest.raises(ValueError, match="a token of its own"):
        ControllerSettings(**base, clients=same)
    twice = [ClientToken(name="a", token="t1"), ClientToken(name="a", token="t2")]
    with pytest.raises(ValueError, match="names must be unique"):
        ControllerSettings(**base, clients=twice)
    settings = ControllerSettings(**base, trusted_networks=[" 10.0.0.0/8", "fd00::/8"])
    assert settings.trusted_networks == ["10.0.0.0/8", "fd00::/8"]
