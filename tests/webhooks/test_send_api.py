"""The send API: POST/GET /api/v1/instances/{name}/messages/, idempotency, filters,
authentication, and that the tenant's key is never in an answer."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from webhooks.models import OutboundMessage, OutboundStatus

URL = "/api/v1/instances/acme/messages/"


@pytest.fixture
def api(client: Client, api_key_headers) -> Client:
    client.defaults.update(api_key_headers)
    return client


def send(api: Client, body: dict, **headers: str):
    return api.post(URL, body, content_type="application/json", **headers)


def test_a_text_send_is_queued_and_answered_202_with_the_message(api, make_instance) -> None:
    make_instance()

    response = send(api, {"to": "+55 11 98765-4321", "text": "Seu pedido saiu."})

    assert response.status_code == 202, response.content
    body = response.json()
    assert {k: body[k] for k in ("kind", "to", "text", "status", "key_id", "attempts")} == {
        "kind": "api",
        "to": "5511987654321@s.whatsapp.net",
        "text": "Seu pedido saiu.",
        "status": "queued",
        "key_id": "",
        "attempts": 0,
    }
    assert "acme-evolution-key" not in response.content.decode()


def test_a_media_send_keeps_the_file_but_answers_only_its_length(api, make_instance) -> None:
    make_instance()

    response = send(
        api,
        {
            "to": "120363025246125888@g.us",
            "media": {"base64": "aGVsbG8=", "mime_type": "application/pdf", "file_name": "a.pdf"},
        },
    )

    assert response.status_code == 202, response.content
    assert response.json()["media"] == {
        "mime_type": "application/pdf",
        "file_name": "a.pdf",
        "caption": "",
        "mediatype": "document",
        "base64_bytes": 8,
    }
    assert OutboundMessage.objects.get().media["base64"] == "aGVsbG8="


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "5511987654321"}, "non_field_errors"),
        (
            {
                "to": "5511987654321",
                "text": "a",
                "media": {"url": "https://x.test/a.png", "mime_type": "image/png"},
            },
            "non_field_errors",
        ),
        ({"to": "12", "text": "a"}, "to"),
        ({"to": "abc@example.com", "text": "a"}, "to"),
        ({"to": "5511987654321", "text": "   "}, "text"),
        # A nested field's error under its dotted name, as the schema documents a 400.
        ({"to": "5511987654321", "media": {"mime_type": "image/png"}}, "media.non_field_errors"),
        (
            {"to": "5511987654321", "media": {"base64": "***", "mime_type": "image/png"}},
            "media.base64",
        ),
    ],
)
def test_a_bad_send_is_refused_with_400_naming_the_field(api, make_instance, body, field) -> None:
    make_instance()

    response = send(api, body)

    assert response.status_code == 400
    errors = response.json()
    assert field in errors
    assert all(isinstance(m, str) for messages in errors.values() for m in messages)
    assert not OutboundMessage.objects.exists()


def test_the_same_idempotency_key_answers_the_same_message_200_and_queues_one(
    api, make_instance
) -> None:
    make_instance()
    body = {"to": "5511987654321", "text": "Olá", "idempotency_key": "order-42"}

    first, second = send(api, body), send(api, body)
    third = send(api, {"to": "5511987654321", "text": "Olá"}, HTTP_IDEMPOTENCY_KEY="order-42")

    assert (first.status_code, second.status_code, third.status_code) == (202, 200, 200)
    assert first.json()["id"] == second.json()["id"] == third.json()["id"]
    assert OutboundMessage.objects.count() == 1


def test_a_used_idempotency_key_with_another_body_answers_409(api, make_instance) -> None:
    make_instance()
    send(api, {"to": "5511987654321", "text": "Olá", "idempotency_key": "k"})

    response = send(api, {"to": "5511987654321", "text": "Tchau", "idempotency_key": "k"})

    assert response.status_code == 409
    assert "idempotency key was used" in response.json()["detail"]
    assert OutboundMessage.objects.count() == 1


def test_a_header_and_a_body_key_that_differ_are_refused(api, make_instance) -> None:
    make_instance()

    response = send(
        api,
        {"to": "5511987654321", "text": "a", "idempotency_key": "a"},
        HTTP_IDEMPOTENCY_KEY="b",
    )

    assert response.status_code == 400


def test_a_send_at_is_kept_and_the_message_waits_for_it(api, make_instance) -> None:
    make_instance()
    later = timezone.now() + timedelta(hours=2)

    response = send(api, {"to": "5511987654321", "text": "a", "send_at": later.isoformat()})

    assert response.status_code == 202
    row = OutboundMessage.objects.get()
    assert row.send_at == later and row.next_attempt_at == later


def test_retrieve_and_list_with_filters(api, make_instance) -> None:
    acme = make_instance()
    other = make_instance(name="other")
    sent = OutboundMessage.objects.create(
        instance=acme,
        chat_jid="5511900000001@s.whatsapp.net",
        text="x",
        status=OutboundStatus.SENT,
        evolution_id="3EB0X",
        kind="api",
    )
    send(api, {"to": "5511900000002", "text": "queued"})
    OutboundMessage.objects.create(instance=other, chat_jid=sent.chat_jid, text="other's")

    one = api.get(f"{URL}{sent.pk}/")
    by_status = api.get(URL, {"status": "sent"})
    by_number = api.get(URL, {"to": "5511900000002"})
    later = api.get(URL, {"created_after": (timezone.now() + timedelta(minutes=1)).isoformat()})

    assert one.status_code == 200 and one.json()["key_id"] == "3EB0X"
    assert [m["id"] for m in by_status.json()["results"]] == [sent.pk]
    assert [m["text"] for m in by_number.json()["results"]] == ["queued"]
    assert later.json()["results"] == []
    assert api.get(f"/api/v1/instances/other/messages/{sent.pk}/").status_code == 404
    assert api.get(URL, {"status": "nope"}).status_code == 400


def test_an_unknown_instance_is_404(api, db) -> None:
    assert send(api, {"to": "5511987654321", "text": "a"}).status_code == 404


def test_without_credentials_it_is_401(client: Client, make_instance) -> None:
    make_instance()

    assert (
        client.post(URL, {"to": "1", "text": "a"}, content_type="application/json").status_code
        == 401
    )


def test_a_staff_user_needs_the_add_permission_to_send(client: Client, make_instance) -> None:
    make_instance()
    user = User.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(user)

    refused = send(client, {"to": "5511987654321", "text": "a"})
    user.user_permissions.add(Permission.objects.get(codename="add_outboundmessage"))
    allowed = send(client, {"to": "5511987654321", "text": "a"})

    assert refused.status_code == 403
    assert "webhooks.add_outboundmessage" in refused.json()["detail"]
    assert allowed.status_code == 202


def test_a_legacy_instance_without_its_own_evolution_cannot_send(api, make_instance) -> None:
    make_instance(legacy_mode=True, evolution_url="", evolution_key="")

    response = send(api, {"to": "5511987654321", "text": "a"})

    assert response.status_code == 409
