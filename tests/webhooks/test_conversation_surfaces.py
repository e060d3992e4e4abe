"""Conversations from the operator's side: the REST API, the CLI and the admin."""

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from instances.models import InstanceConfig
from tests.e2e.harness import text_delivery
from webhooks.ingest import record_delivery
from webhooks.models import Conversation, InboundMessage, Status

pytestmark = pytest.mark.django_db

LIST = "/api/v1/conversations/"
PHONE = "5511987654321"
OTHER = "5511911112222"


def deliver(instance: InstanceConfig, text: str, *, phone: str = PHONE, message_id: str) -> None:
    record_delivery(
        instance=instance, body=text_delivery(message_id=message_id, text=text, phone=phone)
    )


@pytest.fixture
def api(client: Client) -> Client:
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY
    return client


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


@pytest.fixture
def chat(acme) -> Conversation:
    deliver(acme, "oi", message_id="M1")
    deliver(acme, "quanto custa?", message_id="M2")
    InboundMessage.objects.filter(message_id="M1").update(
        status=Status.REPLIED, reply_text="Olá!", sent_at=timezone.now()
    )
    return Conversation.objects.get(instance=acme, chat_jid=f"{PHONE}@s.whatsapp.net")


# --- REST API --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [("get", LIST), ("get", f"{LIST}1/"), ("post", f"{LIST}1/pause/"), ("post", f"{LIST}1/reset/")],
)
def test_every_endpoint_needs_the_api_key(client, chat, method, path) -> None:
    assert getattr(client, method)(path).status_code == 401


def test_the_list_shows_each_chat_with_its_state_and_session(api, chat) -> None:
    [item] = api.get(LIST).json()["results"]

    assert item["id"] == chat.pk
    assert (item["instance"], item["chat_jid"], item["phone"]) == (
        "acme",
        f"{PHONE}@s.whatsapp.net",
        PHONE,
    )
    assert (item["name"], item["state"], item["pause_reason"]) == ("Maria Souza", "active", "")
    assert item["session_name"] == f"acme_{PHONE}"
    assert item["last_message_at"] is not None


def test_the_list_filters_by_instance_phone_and_state(api, acme, make_instance, chat) -> None:
    globex = make_instance(name="globex", whatsapp_instance="globex-wa")
    deliver(globex, "oi", phone=OTHER, message_id="G1")
    api.post(f"{LIST}{chat.pk}/pause/")

    def ids(query: str) -> list[str]:
        return [item["instance"] for item in api.get(f"{LIST}?{query}").json()["results"]]

    assert ids("instance=globex") == ["globex"]
    assert ids(f"phone={PHONE}") == ["acme"]
    assert ids("state=paused") == ["acme"]
    assert ids("state=active") == ["globex"]
    assert api.get(f"{LIST}?state=sleeping").status_code == 400


def test_the_detail_lists_the_messages_in_order_with_their_replies(api, chat) -> None:
    body = api.get(f"{LIST}{chat.pk}/").json()

    first, second = body["messages"]
    assert (first["text"], first["status"], first["reply_text"]) == ("oi", "replied", "Olá!")
    assert first["sent_at"] is not None
    assert (second["text"], second["status"]) == ("quanto custa?", "queued")


def test_pause_for_minutes_resume_and_reset(api, chat) -> None:
    paused = api.post(f"{LIST}{chat.pk}/pause/", {"minutes": 15}, content_type="application/json")
    assert paused.status_code == 200
    assert (paused.json()["state"], paused.json()["pause_reason"]) == ("paused", "paused")
    until = Conversation.objects.get().paused_until
    assert timezone.now() + timedelta(minutes=14) < until < timezone.now() + timedelta(minutes=16)

    forever = api.post(f"{LIST}{chat.pk}/pause/").json()
    assert (forever["state"], forever["paused_until"]) == ("paused", None)

    resumed = api.post(f"{LIST}{chat.pk}/resume/").json()
    assert resumed["state"] == "active"

    reset = api.post(f"{LIST}{chat.pk}/reset/").json()
    assert reset["session_name"] == f"acme_{PHONE}-2"


def test_a_pause_of_zero_minutes_is_refused(api, chat) -> None:
    response = api.post(f"{LIST}{chat.pk}/pause/", {"minutes": 0}, content_type="application/json")

    assert response.status_code == 400
    assert "minutes" in response.json()


def test_the_instance_api_reads_and_validates_the_conversation_settings(api, acme) -> None:
    url = "/api/v1/instances/acme/"
    assert api.get(url).json()["handoff_minutes"] == 30

    changed = api.patch(
        url,
        {"debounce_seconds": 4, "allow_list": ["5511*"], "group_policy": "mentions"},
        content_type="application/json",
    )
    refused = api.patch(url, {"block_list": ["not a phone"]}, content_type="application/json")

    assert changed.status_code == 200, changed.json()
    assert (changed.json()["debounce_seconds"], changed.json()["allow_list"]) == (4, ["5511*"])
    assert refused.status_code == 400
    assert "block_list" in refused.json()


# --- CLI ---------------------------------------------------------------------------
def run(*args: str) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command(*args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def test_the_cli_lists_pauses_resumes_and_resets(chat) -> None:
    code, listed, _ = run("conversations", "list", "--instance", "acme")
    assert code == 0
    assert PHONE in listed and "active" in listed

    code, paused, _ = run("conversations", "pause", str(chat.pk), "--minutes", "10")
    assert code == 0 and "paused (paused, until" in paused

    code, _, _ = run("conversations", "resume", str(chat.pk))
    assert code == 0 and Conversation.objects.get().state == "active"

    code, reset, _ = run("conversations", "reset", str(chat.pk), "--json")
    assert code == 0 and json.loads(reset)["session_name"] == f"acme_{PHONE}-2"


def test_the_cli_explains_an_unknown_conversation(db) -> None:
    code, _, err = run("conversations", "pause", "999")

    assert code == 1
    assert "no conversation 999" in err


def test_the_instances_cli_sets_conversation_settings_with_the_model_s_errors(acme) -> None:
    code, _, _ = run(
        "instances",
        "update",
        "acme",
        "--set",
        "handoff_minutes=5",
        "--set",
        "allow_list=5511*,5521*",
    )
    assert code == 0
    acme.refresh_from_db()
    assert (acme.handoff_minutes, acme.allow_list) == (5, ["5511*", "5521*"])

    code, _, err = run("instances", "update", "acme", "--set", "block_list=abc")
    assert code == 1 and "block_list" in err

    code, _, err = run("instances", "update", "acme", "--set", "colour=blue")
    assert code == 1 and "NAME=VALUE" in err


# --- admin ---------------------------------------------------------------------------
@pytest.fixture
def staff(client: Client) -> Client:
    user = User.objects.create_superuser("admin", "admin@example.com", "pw")
    client.force_login(user)
    return client


def test_the_admin_page_reads_like_the_chat(staff, chat) -> None:
    page = staff.get(f"/admin/webhooks/conversation/{chat.pk}/change/").content.decode()

    assert page.index("oi") < page.index("Olá!") < page.index("quanto custa?")
    for action in ("pause", "resume", "reset"):
        assert f'data-action="{action}"' in page


def test_the_admin_buttons_pause_resume_and_reset(staff, chat) -> None:
    base = f"/admin/webhooks/conversation/{chat.pk}"

    staff.post(f"{base}/pause/")
    assert Conversation.objects.get().state == "paused"
    staff.post(f"{base}/resume/")
    assert Conversation.objects.get().state == "active"
    staff.post(f"{base}/reset/")
    assert Conversation.objects.get().session_epoch == 2
    assert staff.get(f"{base}/pause/").status_code == 405


def test_the_admin_list_filters_by_state(staff, chat) -> None:
    staff.post(f"/admin/webhooks/conversation/{chat.pk}/pause/")

    paused = staff.get("/admin/webhooks/conversation/?state=paused").content.decode()
    active = staff.get("/admin/webhooks/conversation/?state=active").content.decode()

    assert PHONE in paused
    assert PHONE not in active


def test_a_view_only_staff_user_reads_conversations_but_cannot_pause_them(client, chat) -> None:
    from django.contrib.auth.models import Permission

    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_conversation"))
    client.force_login(user)

    assert client.get(LIST).status_code == 200
    refused = client.post(f"{LIST}{chat.pk}/pause/")
    assert refused.status_code == 403
    assert "manage_conversation" in refused.json()["detail"]
    assert Conversation.objects.get().state == "active"
