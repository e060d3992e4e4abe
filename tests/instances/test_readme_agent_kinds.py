"""The README's worked examples of the agent kinds are what the code does: each
curl body creates its instance through the REST API, and the request shown is
that kind's build() for the same WhatsApp text, with its URL and headers."""

import json
import re
import shlex
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.test import Client

from instances.clients.agents import AgentCall, Exchange, agent_for, session_name
from instances.models import InstanceConfig
from tests.conftest import load_fixture
from webhooks.parsing import parse_message, strip_secrets

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
# What each example says the earlier turns and the conversation were.
CALLS: dict[str, dict[str, Any]] = {
    "automagik": {},
    "openai": {"history": (Exchange(content={"text": "oi"}, reply="Olá! Em que posso ajudar?"),)},
    "webhook": {"conversation_id": 42},
}


def examples() -> dict[str, str]:
    text = README.read_text()
    section = text[text.index("### Worked examples") : text.index("### The code")]
    parts = re.split(r"^#### `(\w+)`.*$", section, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def blocks(example: str) -> dict[str, str]:
    found = FENCE.findall(example)
    assert [language for language, _ in found] == ["sh", "http", "json"]
    return dict(found)


def curl_body(command: str) -> tuple[str, dict[str, Any]]:
    """The URL and the JSON body of a `curl -d '...' URL` command."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "curl"
    assert "x-api-key: $OMNIHUB_API_KEY" in words
    return words[-1], json.loads(words[words.index("-d") + 1])


def http_request(block: str) -> tuple[str, str, dict[str, str], Any]:
    head, _, body = block.partition("\n\n")
    first, *header_lines = head.splitlines()
    method, url = first.split(" ", 1)
    headers = dict(line.split(": ", 1) for line in header_lines)
    return method, url, headers, json.loads(body)


def delivery() -> tuple[dict[str, Any], dict[str, Any]]:
    body = load_fixture("messages-upsert-text.json", fresh=False)
    return parse_message(body).to_content(), strip_secrets(body)


def test_the_readme_has_one_worked_example_per_kind() -> None:
    assert list(examples()) == ["automagik", "openai", "webhook"]


@pytest.mark.parametrize("kind", list(CALLS))
def test_a_worked_example_creates_its_instance_and_shows_the_request_its_agent_gets(
    client: Client, db: None, kind: str
) -> None:
    example = blocks(examples()[kind])
    url, body = curl_body(example["sh"])
    assert url == "http://127.0.0.1:8000/api/v1/instances/"

    response = client.post(
        "/api/v1/instances/",
        data=body,
        content_type="application/json",
        HTTP_X_API_KEY=settings.OMNIHUB_API_KEY,
    )

    assert response.status_code == 201, response.content
    instance = InstanceConfig.objects.get(name=body["name"])
    assert instance.agent_kind == kind
    agent = agent_for(instance=instance, http=httpx.AsyncClient())
    content, payload = delivery()
    call = AgentCall(
        content=content,
        payload=payload,
        session=session_name(
            instance=instance, phone=content["phone"], chat_jid=content["chat_jid"]
        ),
        **CALLS[kind],
    )
    built = agent.build(call=call)
    method, sent_to, headers, shown = http_request(example["http"])
    if "channel_payload" in built:
        # Shortened in the README: the delivery, without its apikey.
        assert built["channel_payload"] == payload and "apikey" not in payload
        assert shown["channel_payload"] == {"event": "messages.upsert", "…": "…"}
        built["channel_payload"] = shown["channel_payload"]
    assert (method, sent_to) == ("POST", agent.url())
    assert headers == agent.headers()
    assert shown == built
    # The answer shown is one the kind reads and sends.
    reply = agent.read(body=json.loads(example["json"]))
    assert reply.should_send, reply
