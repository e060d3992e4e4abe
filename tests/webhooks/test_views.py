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
        "/webhook/evolution/acme/not_an.event",
        "/webhook/evolution/acme/%20",
        "/webhook/evolution/messages-upsert/messages-upsert",
    ],
)
def test_it_answers_404_to_an_unknown_instance(client: Client, acme, path: str) -> None:
    response = post(client, path)

    assert response.status_code == 404
    assert response.json() == {"detail": "Unknown instance."}
    assert not InboundMessage.objects.exists()


def test_the_default_route_answers_404_when_there_is_no_default(client: Client, acme) -> None:
    response = post(client, "/webhook/evolution")

    assert response.status_code == 404
    assert response.json() == {"detail": "Unknown instance."}


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
    default = make_instance(
        name="main", is_default=True, webhook_token=TOKEN, whatsapp_instance="tenant-acme-01"
    )

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
        name="default",
        is_default=True,
        legacy_mode=True,
        evolution_url="",
        evolution_key="",
        webhook_token="",
        whatsapp_instance="",
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


# --- the body is looked at only once the path and the token are right ---


def forbid_parsing(monkeypatch) -> None:
    """From now on any JSON parse of a body raises."""

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the body was parsed")

    # The body's one way in (webhooks.ingest's json is the json module itself,
    # which the tenant's own JSON columns need).
    monkeypatch.setattr("webhooks.ingest.read_delivery", explode)
    monkeypatch.setattr("webhooks.parsing.make_storable", explode)
    monkeypatch.setattr("webhooks.parsing.peek_envelope", explode)


@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/webhook/evolution/acme", "wrong-token", 401),
        ("/webhook/evolution/acme", None, 401),
        ("/webhook/evolution/nobody", TOKEN, 404),
        ("/webhook/evolution", TOKEN, 404),
    ],
)
def test_an_unauthenticated_delivery_is_answered_without_parsing_its_body(
    client: Client, acme, monkeypatch, path: str, token: str | None, status: int
) -> None:
    raw = json.dumps(message_body()).encode()
    forbid_parsing(monkeypatch)

    response = post(client, path, raw=raw, token=token)

    assert response.status_code == status


def test_a_large_authenticated_delivery_is_parsed_after_the_token_check(
    client: Client, acme, monkeypatch
) -> None:
    body = message_body("messages-upsert-image-base64.json")
    body["data"]["message"]["base64"] = "A" * (300 * 1024)

    wrong = post(client, "/webhook/evolution/acme", body, token="wrong")
    right = post(client, "/webhook/evolution/acme", body)

    assert wrong.status_code == 401
    assert right.status_code == 200
    assert right.json()["status"] == "queued"


# --- a body over WEBHOOK_MAX_BODY_BYTES ---


def over_the_limit(client: Client, body: Any, *, limit: int = 1000, **kwargs: Any) -> Any:
    from django.test import override_settings

    raw = json.dumps(body).encode()
    assert len(raw) > limit
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=limit):
        return post(client, "/webhook/evolution/acme", raw=raw, **kwargs)


def test_a_message_over_the_size_limit_is_stored_as_ignored_too_large_and_answered_200(
    client: Client, acme
) -> None:
    body = message_body("messages-upsert-image-base64.json")
    body["data"]["message"]["base64"] = "A" * 5000

    response = over_the_limit(client, body)

    # 200, not Django's 400: Evolution would drop it for good, and the log
    # would never show that the message came.
    assert response.status_code == 200
    assert response.json() == {
        "status": "ignored",
        "message_id": body["data"]["key"]["id"],
        "detail": "too large",
    }
    row = InboundMessage.objects.get()
    assert (row.status, row.ignore_reason) == (Status.IGNORED, "too large")
    assert row.chat_jid == parse_chat(body)
    assert "base64" not in json.dumps(row.payload)
    assert row.payload["omnihub"]["too_large_bytes"] > 1000


def parse_chat(body: dict[str, Any]) -> str:
    from webhooks.parsing import parse_message

    return parse_message(body).chat_jid


def test_an_over_size_delivery_without_a_message_key_is_answered_200_ignored(
    client: Client, acme
) -> None:
    body = {"event": "messages.upsert", "instance": "x", "data": {"message": "A" * 5000}}

    response = over_the_limit(client, body)

    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    assert response.json()["detail"].startswith("too large")
    assert not InboundMessage.objects.exists()


def test_an_over_size_delivery_with_a_wrong_token_answers_401(client: Client, acme) -> None:
    body = message_body()
    body["data"]["message"]["conversation"] = "A" * 5000

    response = over_the_limit(client, body, token="wrong")

    assert response.status_code == 401
    assert not InboundMessage.objects.exists()


# --- a deactivated instance: the bot is off, the messages are kept ---


def test_a_deactivated_instance_stores_its_messages_as_ignored_and_answers_200(
    client: Client, make_instance, monkeypatch
) -> None:
    make_instance(webhook_token=TOKEN, is_active=False)
    woken: list[bool] = []
    monkeypatch.setattr("webhooks.views.wakeup.wake_up", lambda: woken.append(True))

    response = post(client, "/webhook/evolution/acme")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ignored",
        "message_id": TEXT_ID,
        "detail": "instance inactive",
    }
    row = InboundMessage.objects.get()
    assert (row.status, row.ignore_reason) == (Status.IGNORED, "instance inactive")
    assert woken == []


def test_a_deactivated_instance_still_checks_the_token(client: Client, make_instance) -> None:
    make_instance(webhook_token=TOKEN, is_active=False)

    response = post(client, "/webhook/evolution/acme", token="wrong")

    assert response.status_code == 401
    assert not InboundMessage.objects.exists()


# --- a list-shaped data: every message is stored ---


def test_every_message_of_a_list_shaped_data_is_stored_and_reported(client: Client, acme) -> None:
    body = message_body()
    first = body["data"]
    second = message_body(message_id="SECOND", phone="5521999990000")["data"]
    from_me = load_fixture("messages-upsert-fromme.json")["data"]
    body["data"] = [first, second, from_me]

    response = post(client, "/webhook/evolution/acme", body)

    assert response.status_code == 200
    assert response.json() == {
        "status": "queued",
        "message_id": TEXT_ID,
        "messages": [
            {"status": "queued", "message_id": TEXT_ID, "detail": ""},
            {"status": "queued", "message_id": "SECOND", "detail": ""},
            {"status": "ignored", "message_id": from_me["key"]["id"], "detail": "human takeover"},
        ],
    }
    stored = {row.message_id: row for row in InboundMessage.objects.all()}
    assert set(stored) == {TEXT_ID, "SECOND", from_me["key"]["id"]}
    assert stored["SECOND"].chat_jid == "5521999990000@s.whatsapp.net"
    # Each row keeps its own message, not the whole list.
    assert stored["SECOND"].payload["data"]["key"]["id"] == "SECOND"


# --- the legacy route and Evolution's global webhook ---


@pytest.fixture
def main(make_instance):
    return make_instance(
        name="main", is_default=True, webhook_token=TOKEN, whatsapp_instance="main-wa"
    )


def from_instance(evolution_name: str, name: str = "messages-upsert-text.json") -> dict[str, Any]:
    body = message_body(name) if name.startswith("messages-") else load_fixture(name)
    body["instance"] = evolution_name
    return body


def test_the_legacy_route_ignores_a_message_of_another_tenants_instance(
    client: Client, acme, main
) -> None:
    response = post(client, "/webhook/evolution", from_instance(acme.whatsapp_instance))

    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "detail": "instance belongs to acme"}
    assert not InboundMessage.objects.exists()


def test_the_legacy_route_ignores_a_message_of_an_unknown_instance(
    client: Client, acme, main
) -> None:
    response = post(client, "/webhook/evolution/messages-upsert", from_instance("stranger"))

    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "detail": "unknown instance"}
    assert not InboundMessage.objects.exists()


def test_the_legacy_route_keeps_the_default_state_from_another_tenants_connection_update(
    client: Client, acme, main
) -> None:
    response = post(
        client, "/webhook/evolution", from_instance("acme-wa", "connection-update-open.json")
    )

    assert response.status_code == 200
    assert response.json()["detail"] == "instance belongs to acme"
    assert not ConnectionState.objects.exists()


def test_the_legacy_route_handles_the_default_instances_own_messages(
    client: Client, acme, main
) -> None:
    response = post(client, "/webhook/evolution", from_instance("main-wa"))

    assert response.json()["status"] == "queued"
    assert InboundMessage.objects.get().instance == main


def test_a_legacy_default_without_a_whatsapp_instance_takes_all_but_other_tenants(
    client: Client, acme, make_instance
) -> None:
    make_instance(
        name="default",
        is_default=True,
        legacy_mode=True,
        evolution_url="",
        evolution_key="",
        webhook_token="",
        whatsapp_instance="",
    )

    own = post(client, "/webhook/evolution", from_instance("anything"), token=None)
    other = post(client, "/webhook/evolution", from_instance("acme-wa"), token=None)

    assert own.json()["status"] == "queued"
    assert other.json() == {"status": "ignored", "detail": "instance belongs to acme"}
    assert InboundMessage.objects.count() == 1


def test_a_tenant_route_is_not_filtered_by_the_bodys_instance(client: Client, acme) -> None:
    response = post(client, "/webhook/evolution/acme", from_instance("renamed-in-evolution"))

    assert response.json()["status"] == "queued"


# --- event suffixes ---


@pytest.mark.parametrize(
    "path",
    ["/webhook/evolution/acme/send-message-update", "/webhook/evolution/acme/some-future-event"],
)
def test_it_answers_an_unknown_event_200_ignored(client: Client, acme, path: str) -> None:
    body = {"event": "send.message.update", "instance": "acme-wa", "data": {"key": {"id": "X"}}}

    response = post(client, path, body)

    # 404 would make Evolution drop the event for good (and log an error for each).
    assert response.status_code == 200
    assert response.json() == {
        "status": "ignored",
        "detail": "event send.message.update is not handled",
    }


def test_the_default_instance_takes_send_message_update_on_the_legacy_route(
    client: Client, main
) -> None:
    body = {"event": "send.message.update", "instance": "main-wa", "data": {}}

    response = post(client, "/webhook/evolution/send-message-update", body)

    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
