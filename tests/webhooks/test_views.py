"""The webhook endpoint: routes, tokens, status codes and what gets stored."""

import json
from typing import Any

import pytest
from django.db import OperationalError
from django.test import Client

from tests.conftest import load_fixture
from tests.webhooks.conftest import message_body
from webhooks import rows
from webhooks.models import ConnectionState, InboundMessage, Status

TOKEN = "acme-webhook-token"
TEXT_ID = "E8404E2E2C1B45956611886A03486718"
FIXTURE_APIKEY = "B6D9E2A4-1F3C-4E8A-9C7B-2D5E8F0A1B3C"

pytestmark = pytest.mark.django_db


def post(
    client: Client,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    token: str | None = TOKEN,
) -> Any:
    data = raw if raw is not None else json.dumps(body if body is not None else message_body())
    headers = {"X-Webhook-Token": token} if token is not None else {}
    return client.post(path, data=data, content_type="application/json", headers=headers)


@pytest.fixture
def acme(make_instance):
    return make_instance(webhook_token=TOKEN)


def test_it_queues_a_message_and_answers_its_id(client: Client, acme) -> None:
    response = post(client, "/webhook/evolution/acme")

    assert response.status_code == 200
    assert response.json() == {"status": "queued", "message_id": TEXT_ID}
    row = InboundMessage.objects.get()
    assert (row.instance, row.message_id, row.status) == (acme, TEXT_ID, Status.QUEUED)


def test_a_queued_message_wakes_the_workers(client: Client, acme, monkeypatch) -> None:
    woken: list[bool] = []
    monkeypatch.setattr("webhooks.views.wakeup.wake_up", lambda: woken.append(True))

    post(client, "/webhook/evolution/acme")
    post(client, "/webhook/evolution/acme", load_fixture("messages-upsert-fromme.json"))

    assert woken == [True]


def test_it_answers_200_ignored_for_a_message_it_will_not_answer(client: Client, acme) -> None:
    response = post(client, "/webhook/evolution/acme", load_fixture("messages-upsert-fromme.json"))

    assert response.status_code == 200
    assert response.json() == {
        "status": "ignored",
        "message_id": "3A4D6578245FF100A69A",
        "detail": "human takeover",
    }
    assert InboundMessage.objects.get().status == Status.IGNORED


def test_it_answers_200_ignored_for_an_event_it_does_not_handle(client: Client, acme) -> None:
    response = post(client, "/webhook/evolution/acme", load_fixture("presence-update.json"))

    assert response.status_code == 200
    assert response.json() == {
        "status": "ignored",
        "detail": "event presence.update is not handled",
    }
    assert not InboundMessage.objects.exists()


def test_it_records_a_connection_update_and_answers_ignored(client: Client, acme) -> None:
    response = post(client, "/webhook/evolution/acme", load_fixture("connection-update-open.json"))

    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "detail": "connection state open recorded"}
    assert ConnectionState.objects.get(instance=acme).state == "open"


def test_it_answers_200_duplicate_for_a_message_delivered_twice(client: Client, acme) -> None:
    post(client, "/webhook/evolution/acme")
    response = post(client, "/webhook/evolution/acme")

    assert response.status_code == 200
    assert response.json() == {
        "status": "duplicate",
        "message_id": TEXT_ID,
        "detail": "already received",
    }
    assert InboundMessage.objects.count() == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"[1]",
        b'"x"',
        b"null",
        b"",
        b'{"event": "messages.upsert",',
        b'{"event": "messages.upsert", "x": "\xc3\x28"}',
        b"[" * 100_000,
    ],
    ids=["list", "string", "null", "empty", "invalid-json", "not-utf8", "too-deep"],
)
def test_it_answers_400_to_a_body_that_is_not_a_json_object(
    client: Client, acme, raw: bytes
) -> None:
    response = post(client, "/webhook/evolution/acme", raw=raw)

    assert response.status_code == 400
    assert response.json() == {"detail": "The body must be a JSON object."}
    assert not InboundMessage.objects.exists()


@pytest.mark.parametrize("token", [None, "", "wrong-token", TOKEN.upper()])
def test_it_answers_401_to_a_missing_or_wrong_header_token(
    client: Client, acme, token: str | None
) -> None:
    response = post(client, "/webhook/evolution/acme", token=token)

    assert response.status_code == 401
    assert response.json() == {"detail": "Missing or wrong webhook token."}
    assert not InboundMessage.objects.exists()


def test_it_accepts_the_token_in_the_query_string(client: Client, acme) -> None:
    wrong = post(client, "/webhook/evolution/acme?token=wrong", token=None)
    right = post(client, f"/webhook/evolution/acme?token={TOKEN}", token=None)

    assert wrong.status_code == 401
    assert right.status_code == 200
    assert right.json()["status"] == "queued"


def test_an_instance_without_a_token_accepts_any_delivery(client: Client, make_instance) -> None:
    make_instance(webhook_token="")

    response = post(client, "/webhook/evolution/acme", token=None)

    assert response.status_code == 200
    assert response.json()["status"] == "queued"


@pytest.mark.parametrize(
    "path",
    [
        "/webhook/evolution/nobody",
        "/webhook/evolution/nobody/messages-upsert",
        "/webhook/evolution/acme/not-an-event",
        "/webhook/evolution/messages-upsert/messages-upsert",
    ],
)
def test_it_answers_404_to_an_unknown_instance(client: Client, acme, path: str) -> None:
    response = post(client, path)

    assert response.status_code == 404
    assert response.json() == {"detail": "Unknown or inactive instance."}
    assert not InboundMessage.objects.exists()


def test_it_answers_404_to_an_inactive_instance(client: Client, make_instance) -> None:
    make_instance(webhook_token=TOKEN, is_active=False)

    response = post(client, "/webhook/evolution/acme")

    assert response.status_code == 404
    assert "detail" in response.json()
    assert not InboundMessage.objects.exists()


def test_the_default_route_answers_404_when_there_is_no_default(client: Client, acme) -> None:
    response = post(client, "/webhook/evolution")

    assert response.status_code == 404
    assert response.json() == {"detail": "Unknown or inactive instance."}


@pytest.mark.parametrize(
    "path",
    [
        "/webhook/evolution",
        "/webhook/evolution/",
        "/webhook/evolution/messages-upsert",
        "/webhook/evolution/MESSAGES-UPSERT/",
    ],
)
def test_the_default_route_and_its_event_routes_reach_the_default_instance(
    client: Client, acme, make_instance, path: str
) -> None:
    default = make_instance(name="main", is_default=True, webhook_token=TOKEN)

    response = post(client, path)

    assert response.status_code == 200, response.content
    assert InboundMessage.objects.get().instance == default


@pytest.mark.parametrize(
    "path",
    [
        "/webhook/evolution/acme/",
        "/webhook/evolution/acme/messages-upsert",
        "/webhook/evolution/acme/messages-upsert/",
    ],
)
def test_an_instance_is_reached_with_a_slash_or_an_event_suffix(
    client: Client, acme, path: str
) -> None:
    response = post(client, path)

    assert response.status_code == 200
    assert InboundMessage.objects.get().instance == acme


def test_it_answers_405_to_a_get(client: Client, acme) -> None:
    response = client.get("/webhook/evolution/acme", headers={"X-Webhook-Token": TOKEN})

    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert response.json() == {"detail": "Use POST."}


def test_it_answers_503_and_stores_nothing_when_the_database_fails(
    client: Client, acme, monkeypatch
) -> None:
    def locked(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("database is locked")

    monkeypatch.setattr(rows, "insert_message", locked)

    response = post(client, "/webhook/evolution/acme")

    assert response.status_code == 503
    assert response.json() == {"detail": "The delivery could not be stored."}
    assert not InboundMessage.objects.exists()


def test_it_stores_the_delivery_without_its_apikey(client: Client, acme) -> None:
    body = message_body()
    assert body["apikey"] == FIXTURE_APIKEY

    post(client, "/webhook/evolution/acme", body)

    row = InboundMessage.objects.get()
    assert "apikey" not in row.payload
    assert row.payload == {k: v for k, v in body.items() if k != "apikey"}
    assert FIXTURE_APIKEY not in json.dumps(row.payload)
    assert (row.reply_server_url, row.reply_api_key) == ("", "")


def test_the_legacy_default_instance_keeps_where_to_reply(client: Client, make_instance) -> None:
    make_instance(
        name="default", is_default=True, evolution_url="", evolution_key="", webhook_token=""
    )

    response = post(client, "/webhook/evolution", token=None)

    assert response.status_code == 200
    row = InboundMessage.objects.get()
    assert row.reply_server_url == "https://evolution.example.com"
    assert row.reply_api_key == FIXTURE_APIKEY
    assert "apikey" not in row.payload


def test_it_accepts_a_31_mb_delivery(client: Client, acme) -> None:
    body = message_body("messages-upsert-image-base64.json")
    body["data"]["message"]["base64"] = "A" * (31 * 1024 * 1024)

    response = post(client, "/webhook/evolution/acme", body)

    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    row = InboundMessage.objects.get()
    assert row.content["media"]["has_base64"] is True
    assert len(row.payload["data"]["message"]["base64"]) == 31 * 1024 * 1024
