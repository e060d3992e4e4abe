"""Test connections' shared failure wording (HttpAgent.probe), the same for every
kind that calls its server: no answer in time, unreachable, the key refused."""

from typing import Any

import httpx
import pytest

from instances.clients.http import ResponseTooLarge
from tests.instances.agents.conftest import check

pytestmark = pytest.mark.asyncio

CALLED = [
    pytest.param({}, "http://agent.acme.test/health", id="automagik"),
    pytest.param(
        {"agent_kind": "openai", "agent_api_url": "http://llm.acme.test/v1"},
        "http://llm.acme.test/v1/models",
        id="openai",
    ),
]


@pytest.mark.parametrize(("kind", "url"), CALLED)
@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_is_a_bad_key(kind: dict[str, Any], url: str, status: int) -> None:
    result, _ = await check((status, {"detail": "Invalid API key"}), **kind)

    assert (result.ok, result.outcome) == (False, "bad_key")
    assert result.message == (
        f"The agent server at {url} answered {status}: it refuses the instance's agent API key."
    )


@pytest.mark.parametrize(("kind", "url"), CALLED)
async def test_no_answer_in_time_fails_the_check(kind: dict[str, Any], url: str) -> None:
    result, _ = await check(httpx.ReadTimeout("no answer"), **kind)

    assert (result.ok, result.outcome) == (False, "failed")
    assert result.message == f"The agent server at {url} did not answer within 2 s."


@pytest.mark.parametrize(("kind", "url"), CALLED)
async def test_an_unreachable_server_fails_the_check_without_the_key(
    kind: dict[str, Any], url: str
) -> None:
    # A reason that echoes what was sent (a proxy's error, say) loses the key.
    result, _ = await check(httpx.ConnectError("proxy refused key acme-agent-key"), **kind)

    assert (result.ok, result.outcome) == (False, "failed")
    assert (
        result.message == f"Could not reach the agent server at {url}: proxy refused key [hidden]"
    )


@pytest.mark.parametrize(("kind", "url"), CALLED)
async def test_an_answer_too_large_to_read_still_means_the_server_is_there(
    kind: dict[str, Any], url: str
) -> None:
    # OpenRouter's model list, say, against OUTBOUND_MAX_RESPONSE_BYTES.
    result, _ = await check(ResponseTooLarge("the answer declares 5000000 bytes"), **kind)

    assert (result.ok, result.outcome) == (True, "reachable")
    assert result.message == (
        f"The agent server at {url} answers, but more than the hub reads (the answer "
        "declares 5000000 bytes): its answer is not checked."
    )
