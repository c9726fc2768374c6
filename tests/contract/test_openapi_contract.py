"""The agent and the controller hold to their OpenAPI documents, as Schemathesis checks them live.

The agent runs on its simulated desktop (`gpu-agent run --simulate`) and the controller in front
of it (`gpu-controller run`), each in its own process with a bearer token, as in production.
Schemathesis reads each `/openapi.json` and sends what the document allows and what it forbids:
its explicit examples, the coverage cases (each boundary of each constraint, one at a time),
bounded property-based fuzzing, and, on the controller, stateful sequences that follow the
`Location` of a new image job. Every response must pass every check: no 5xx, a documented status
and content type, a body and headers that match the schema, every schema-valid request accepted
and every schema-invalid one refused, 401 without the token, 405 with `Allow` for a method the
path lacks.

The draw is seeded, so a run sends the same requests every time (a new failure comes from a
change, not from the draw). Two checks are left out where the document cannot speak:
`use_after_free`, since `DELETE` cancels a job or a prompt and the record stays readable, and
positive-data acceptance for the refusals in `STATE_REFUSALS`, which depend on what ComfyUI has
installed or what came before, not on the request's shape. `GET /v1/events` is a websocket
handshake, which an HTTP client cannot follow, and a job's event stream lasts as long as the job:
the stateful run leaves it out; their own tests cover both.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import schemathesis
from hypothesis import settings
from schemathesis import Case, Response

from bench.footprint import ChildGroup, spawn
from tests.waiting import wait_until

# Each test well within this on two cores (the first one starts the services too).
pytestmark = [pytest.mark.real_time, pytest.mark.timeout(180)]

T = TypeVar("T")

AGENT_TOKEN = "contract-agent-t0ken"
CONTROLLER_TOKEN = "contract-controller-t0ken"
AGENT_NAME = "desk"
SEED = 20260101
# Fuzzed cases per operation, on top of the examples and the coverage cases; enough to cross
# every constraint, few enough that both services take well under a minute on two cores.
MAX_EXAMPLES = 25
# Scenarios of the stateful run on the controller (image jobs made, read, followed, cancelled).
STATEFUL_EXAMPLES = 10
REQUEST_TIMEOUT_S = 30.0
# Real seconds: a loaded machine takes seconds just to start a Python process with the services.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# The simulated desktop's speed: simulated work (a /free, a cancelled job) ends this much sooner.
SIM_SPEED = 10

# (operation, status, error code): refusals of a schema-valid request that depend on state the
# document cannot describe, so positive-data acceptance does not apply to them.
STATE_REFUSALS = frozenset(
    {
        # ComfyUI validates the graph against the node classes it has installed.
        ("POST /v1/comfyui/prompts", 400, "workflow_rejected"),
        # An Idempotency-Key used before with another body (the IETF draft's 422).
        ("POST /v1/images", 422, "idempotency_key_reused"),
        # Whether an uploaded file is a picture, and whether the workflow loads it by the name
        # it came with, depends on the file's bytes and the workflow, not on the form's shape.
        ("POST /v1/images", 400, "input_rejected"),
    }
)
CHECKS_LEFT_OUT = {"use_after_free": {"enabled": False}}


@dataclass(frozen=True)
class Live:
    """The running services' base URLs."""

    agent_url: str
    controller_url: str


@contextlib.contextmanager
def background_loop() -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """A real-time event loop on its own thread, for the child processes; yields `run(coro)`,
    which runs a coroutine there and returns its result."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="contract-services", daemon=True)
    thread.start()

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(START_TIMEOUT_S)

    try:
        yield run
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT_S)
        loop.close()


async def _healthy(controller_url: str) -> None:
    """Until the controller has a snapshot of its agent (`/healthz` needs no token)."""

    async def ready() -> bool:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(f"{controller_url}/healthz")
                return response.status_code == 200 and response.json()["healthy_agents"] == 1
        return False

    await wait_until(ready, timeout_s=START_TIMEOUT_S, poll_s=0.1, what="a healthy agent")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The agent on its simulated desktop and the controller in front of it, each a process."""
    workdir: Path = tmp_path_factory.mktemp("contract")
    agent_token = workdir / "agent.token"
    agent_token.write_text(AGENT_TOKEN)
    controller_token = workdir / "controller.token"
    controller_token.write_text(CONTROLLER_TOKEN)
    agent_args = ["run", "--simulate", "--speed", str(SIM_SPEED), "--port", "0"]
    with background_loop() as run:
        group = ChildGroup()
        try:
            (agent,) = run(
                group.start(
                    spawn("agent", "gpu_agent.cli", [*agent_args, "--token-file", str(agent_token)])
                )
            )
            config = workdir / "controller.toml"
            config.write_text(
                f'[[agents]]\nname = "{AGENT_NAME}"\nurl = "{agent.url}"\ntoken = "{AGENT_TOKEN}"\n'
            )
            controller_args = ["run", "--port", "0", "--config", str(config)]
            controller_args += ["--data-dir", str(workdir / "controller")]
            controller_args += ["--token-file", str(controller_token)]
            (controller,) = run(group.start(spawn("controller", "controller.cli", controller_args)))
            run(_healthy(controller.url))
            yield Live(agent_url=agent.url, controller_url=controller.url)
        finally:
            run(group.stop_all())


def _schema(base_url: str, token: str) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # The documents' own security scheme, so the checks know the token is the real one.
            "auth": {"openapi": {"bearer": {"bearer": token}}},
            "request-timeout": REQUEST_TIMEOUT_S,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "checks": CHECKS_LEFT_OUT,
        }
    )
    return schemathesis.openapi.from_url(
        f"{base_url}/openapi.json", config=config, timeout=REQUEST_TIMEOUT_S
    )


@pytest.fixture(scope="module")
def agent_schema(live: Live) -> schemathesis.BaseSchema:
    return _schema(live.agent_url, AGENT_TOKEN)


@pytest.fixture(scope="module")
def controller_schema(live: Live) -> schemathesis.BaseSchema:
    return _schema(live.controller_url, CONTROLLER_TOKEN)


def _refused_by_state(case: Case[Any], response: Response) -> bool:
    if response.status_code < 400:
        return False
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return (case.operation.label, response.status_code, code) in STATE_REFUSALS


def validate(case: Case[Any], response: Response, **kwargs: Any) -> None:
    """Every check the configuration enables, but positive-data acceptance for a refusal that
    depends on state (`STATE_REFUSALS`)."""
    __tracebackhide__ = True
    excluded = [schemathesis.checks.positive_data_acceptance]
    case.validate_response(
        response, excluded_checks=excluded if _refused_by_state(case, response) else None, **kwargs
    )


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # Schemathesis' lazy loader names each operation's subtest by rewriting `node._nodeid`,
    # an attribute pytest 9 no longer has; give it one to read (the names stay pytest's).
    node: Any = request.node
    node._nodeid = node.nodeid


agent = schemathesis.pytest.from_fixture("agent_schema").exclude(method="GET", path="/v1/events")
controller = schemathesis.pytest.from_fixture("controller_schema")


@agent.parametrize()
def test_agent_answers_as_its_document_says(case: Case[Any]) -> None:
    validate(case, case.call())


@controller.parametrize()
def test_controller_answers_as_its_document_says(case: Case[Any]) -> None:
    validate(case, case.call())


def test_controller_holds_to_its_document_across_calls(
    controller_schema: schemathesis.BaseSchema,
) -> None:
    """Stateful: image jobs made, then read, cancelled and fetched through their `Location`.

    A job's event stream lasts as long as the job, and a held job may wait for hours: its route
    is left to the stateless test (which only reaches unknown jobs) and its own tests."""
    base = controller_schema.exclude(
        method="GET", path="/v1/images/{job_id}/events"
    ).as_state_machine()

    class Machine(base):  # type: ignore[valid-type,misc]
        def validate_response(
            self, response: Response, case: Case[Any], additional_checks: Any = None, **kwargs: Any
        ) -> None:
            __tracebackhide__ = True
            validate(
                case,
                response,
                additional_checks=additional_checks,
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    # The configuration's settings (no deadline, no example database, derandomized), fewer runs.
    configured = controller_schema.config.get_hypothesis_settings()
    Machine.run(settings=settings(configured, max_examples=STATEFUL_EXAMPLES))
