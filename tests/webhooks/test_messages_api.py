from datetime import timedelta

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from instances.models import InstanceConfig
from tests.webhooks.test_admin_messages import add_message
from webhooks.models import InboundMessage, Status

LIST = "/api/v1/messages/"
REPLY_KEY = "legacy-reply-KEY-never-returned"
CLAIM_TOKEN = "claimtoken0123456789abcdefabcdef"


def detail_url(message: InboundMessage) -> str:
    return f"{LIST}{message.pk}/"


def retry_url(message: InboundMessage) -> str:
    return f"{LIST}{message.pk}/retry/"


def ids(response) -> list[int]:
    return [row["id"] for row in response.json()["results"]]


@pytest.fixture
def api(client: Client, db: None) -> Client:
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY
    return client


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


@pytest.fixture
def globex(make_instance) -> InstanceConfig:
    return make_instance(name="globex")


@pytest.mark.parametrize(
    ("method", "path"), [("get", LIST), ("get", f"{LIST}1/"), ("post", f"{LIST}1/retry/")]
)
def test_every_endpoint_needs_the_api_key(client, acme, method, path):
    add_message(acme)

    without = getattr(client, method)(path)
    wrong = getattr(client, method)(path, HTTP_X_API_KEY="not-the-key")

    assert without.status_code == 401
    assert wrong.status_code == 401


def test_the_list_is_newest_first_with_instance_names_and_timings(api, acme):
    received = timezone.now() - timedelta(minutes=1)
    older = add_message(acme, received_at=received - timedelta(minutes=1))
    newer = add_message(
        acme,
        received_at=received,
        agent_started_at=received + timedelta(milliseconds=100),
        agent_finished_at=received + timedelta(milliseconds=1600),
        sent_at=received + timedelta(milliseconds=1800),
        finished_at=received + timedelta(milliseconds=1810),
        reply_text="Das 9h às 18h",
        agent_attempts=1,
        send_attempts=1,
        attempts=1,
    )

    response = api.get(LIST)

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    assert ids(response) == [newer.pk, older.pk]
    row = body["results"][0]
    assert row == {
        **row,
        "instance": "acme",
        "status": "replied",
        "reply_text": "Das 9h às 18h",
        "agent_ms": 1500,
        "total_ms": 1810,
        "attempts": 1,
        "agent_attempts": 1,
        "send_attempts": 1,
        "last_error": "",
    }
    assert body["results"][1]["agent_ms"] is None
    assert "payload" not in row
    assert "agent_request" not in row


def test_no_answer_carries_the_reply_key_or_the_claim_token(api, make_instance):
    legacy = make_instance(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )
    message = add_message(
        legacy, status=Status.PROCESSING, reply_api_key=REPLY_KEY, claim_token=CLAIM_TOKEN
    )

    for response in (api.get(LIST), api.get(detail_url(message))):
        assert response.status_code == 200
        for secret in (REPLY_KEY, CLAIM_TOKEN, "reply_api_key", "claim_token"):
            assert secret.encode() not in response.content, secret


def test_the_list_filters_by_instance_and_status(api, acme, globex):
    failed = add_message(acme, status=Status.FAILED)
    add_message(acme, status=Status.REPLIED)
    add_message(globex, status=Status.FAILED)

    assert ids(api.get(LIST, {"instance": "acme", "status": "failed"})) == [failed.pk]
    assert len(ids(api.get(LIST, {"status": "failed"}))) == 2
    assert ids(api.get(LIST, {"instance": "nobody"})) == []


def test_the_list_filters_by_received_time(api, acme):
    now = timezone.now()
    old = add_message(acme, received_at=now - timedelta(days=3))
    middle = add_message(acme, received_at=now - timedelta(days=2))
    add_message(acme, received_at=now - timedelta(hours=1))

    response = api.get(
        LIST,
        {
            "received_after": (now - timedelta(days=3)).isoformat(),
            "received_before": (now - timedelta(days=1)).isoformat(),
        },
    )

    assert ids(response) == [middle.pk, old.pk]


@pytest.mark.parametrize(
    ("term", "expected"), [("98765", "by phone"), ("HORÁRIO", "by text"), ("3EB0X", "by id")]
)
def test_the_list_searches_phone_text_and_message_id(api, acme, term, expected):
    messages = {
        "by phone": add_message(acme, phone="5511987654321", text="ok"),
        "by text": add_message(acme, phone="5521900000000", text="Qual o HORÁRIO?"),
        "by id": add_message(acme, phone="5531900000000", text="ok", message_id="3EB0X"),
    }

    assert ids(api.get(LIST, {"search": term})) == [messages[expected].pk]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "lost"}, "status"),
        ({"received_after": "yesterday"}, "received_after"),
        ({"received_before": "2025-13-01T00:00"}, "received_before"),
    ],
)
def test_a_bad_filter_is_a_400_naming_the_parameter(api, acme, params, field):
    response = api.get(LIST, params)

    assert response.status_code == 400
    assert list(response.json()) == [field]


def test_the_list_is_paginated(api, acme):
    created = [add_message(acme) for _ in range(5)]

    first = api.get(LIST, {"page_size": 2})
    last = api.get(LIST, {"page_size": 2, "page": 3})
    beyond = api.get(LIST, {"page_size": 2, "page": 4})

    assert first.json()["count"] == 5
    assert ids(first) == [created[4].pk, created[3].pk]
    assert "page=2" in first.json()["next"]
    assert ids(last) == [created[0].pk]
    assert last.json()["next"] is None
    assert beyond.status_code == 404


def test_the_detail_has_the_agent_exchange_and_the_raw_payload(api, acme):
    payload = {"event": "messages.upsert", "data": {"message": {"base64": "QUJD" * 100}}}
    message = add_message(
        acme,
        payload=payload,
        agent_request={"message_content": "[Maria]: Oi"},
        agent_response={"message": "Olá", "success": True},
        reply_text="Olá",
    )

    response = api.get(detail_url(message))

    assert response.status_code == 200
    body = response.json()
    assert body["payload"] == payload
    assert body["agent_request"] == {"message_content": "[Maria]: Oi"}
    assert body["agent_response"] == {"message": "Olá", "success": True}
    assert body["instance"] == "acme"


@pytest.mark.parametrize("path", [f"{LIST}999999/", f"{LIST}abc/", f"{LIST}999999/retry/"])
def test_an_unknown_message_is_a_404(api, acme, path):
    method = api.post if path.endswith("retry/") else api.get

    assert method(path).status_code == 404


def test_retry_requeues_a_failed_message_and_keeps_its_unsent_reply(
    api, acme, django_capture_on_commit_callbacks
):
    message = add_message(
        acme,
        status=Status.FAILED,
        reply_text="Das 9h às 18h",
        finished_at=timezone.now(),
        last_error="Evolution answered 500",
        first_send_failed_at=timezone.now() - timedelta(minutes=20),
    )

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api.post(retry_url(message))

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "queued"
    assert body["reply_text"] == "Das 9h às 18h"
    assert body["finished_at"] is None
    assert body["last_error"] == "Evolution answered 500"
    message.refresh_from_db()
    assert message.status == Status.QUEUED
    assert message.first_send_failed_at is None
    assert len(callbacks) == 1


def test_retry_asks_the_agent_again_when_it_never_answered(api, acme):
    message = add_message(acme, status=Status.FAILED, reply_text=None, agent_attempts=4)

    response = api.post(retry_url(message))

    assert response.status_code == 200
    message.refresh_from_db()
    assert message.reply_text is None
    assert message.agent_attempts == 0


@pytest.mark.parametrize("current", [Status.QUEUED, Status.PROCESSING, Status.REPLIED])
def test_retry_of_a_message_that_is_not_failed_is_a_409(api, acme, current):
    message = add_message(acme, status=current, reply_text="sent")

    response = api.post(retry_url(message))

    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Only failed messages can be retried; this one is {current}."
    }
    message.refresh_from_db()
    assert message.status == current


def test_retry_of_a_legacy_message_without_its_key_explains_why_not(api, make_instance):
    legacy = make_instance(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )
    message = add_message(legacy, status=Status.FAILED, reply_text="Oi", reply_api_key="")

    response = api.post(retry_url(message))

    assert response.status_code == 409
    assert "Evolution URL and key" in response.json()["detail"]


def test_the_schema_documents_the_messages_endpoints(client, db):
    schema = client.get("/api/schema/?format=json").json()
    paths = schema["paths"]

    listing = paths["/api/v1/messages/"]["get"]
    parameters = {p["name"] for p in listing["parameters"]}
    assert {"instance", "status", "received_after", "received_before", "search"} <= parameters
    assert set(listing["responses"]) == {"200", "400", "401", "403", "404"}
    assert set(paths["/api/v1/messages/{id}/"]["get"]["responses"]) == {"200", "401", "403", "404"}
    retry = paths["/api/v1/messages/{id}/retry/"]["post"]
    assert set(retry["responses"]) == {"200", "401", "403", "404", "409"}
    assert "requestBody" not in retry
    components = schema["components"]["schemas"]
    for name in ("Message", "MessageDetail"):
        assert not {"reply_api_key", "claim_token"} & set(components[name]["properties"])
    assert "payload" not in components["Message"]["properties"]
    assert "payload" in components["MessageDetail"]["properties"]


def test_a_voice_notes_transcript_is_in_the_list_and_the_detail(api, acme) -> None:
    message = add_message(acme, message_id="VOICE1", status=Status.REPLIED)
    InboundMessage.objects.filter(pk=message.pk).update(transcript="quero uma pizza")

    listed = api.get(LIST).json()["results"]
    detail = api.get(detail_url(message)).json()

    assert [row["transcript"] for row in listed] == ["quero uma pizza"]
    assert detail["transcript"] == "quero uma pizza"
