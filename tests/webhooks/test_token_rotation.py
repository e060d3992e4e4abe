"""After a new webhook token, Evolution's retries still carry the old one: the old
token is accepted for WEBHOOK_TOKEN_GRACE_HOURS, and is never shown anywhere."""

import json
from collections.abc import Callable
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client, override_settings
from django.utils import timezone

from instances.models import InstanceConfig
from tests.conftest import CONVERSATION_FORM_DEFAULTS
from tests.webhooks.conftest import message_body

OLD = "old-webhook-token-0001"
NEW = "new-webhook-token-0002"
WEBHOOK = "/webhook/evolution/acme"

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance(webhook_token=OLD)


def deliver(client: Client, token: str, message_id: str = "ROTATION-1") -> int:
    body = json.dumps(message_body(message_id=message_id))
    headers = {"X-Webhook-Token": token}
    return client.post(WEBHOOK, body, content_type="application/json", headers=headers).status_code


def rotate_in_the_admin(admin_client: Client, acme: InstanceConfig) -> str:
    form = {
        "is_active": "on",
        "evolution_url": acme.evolution_url,
        "whatsapp_instance": acme.whatsapp_instance,
        "agent_api_url": acme.agent_api_url,
        "default_agent": acme.default_agent,
        "agent_timeout": "60",
        "fallback_message": "Try again later.",
        "regenerate_webhook_token": "on",
        **CONVERSATION_FORM_DEFAULTS,
        "_save": "Save",
    }
    response = admin_client.post(f"/admin/instances/instanceconfig/{acme.pk}/change/", form)
    assert response.status_code == 302
    return InstanceConfig.objects.get(pk=acme.pk).webhook_token


def rotate_with_the_api(admin_client: Client, acme: InstanceConfig) -> str:
    response = admin_client.patch(
        "/api/v1/instances/acme/", {"webhook_token": NEW}, content_type="application/json"
    )
    assert response.status_code == 200
    assert OLD not in response.content.decode()
    return NEW


def rotate_with_the_cli(admin_client: Client, acme: InstanceConfig) -> str:
    out = StringIO()
    call_command("instances", "update", "acme", "--webhook-token", NEW, stdout=out)
    call_command("instances", "show", "acme", "--json", stdout=out)
    assert OLD not in out.getvalue()
    return NEW


ROTATIONS: dict[str, Callable[[Client, InstanceConfig], str]] = {
    "admin": rotate_in_the_admin,
    "api": rotate_with_the_api,
    "cli": rotate_with_the_cli,
}


@pytest.mark.parametrize("how", list(ROTATIONS))
def test_the_previous_token_is_accepted_after_a_rotation(client, admin_client, acme, how):
    new = ROTATIONS[how](admin_client, acme)

    assert new != OLD
    assert deliver(client, OLD, "RETRIED-WITH-OLD") == 200
    assert deliver(client, new, "SENT-WITH-NEW") == 200
    assert deliver(client, "not-the-token", "FORGED") == 401


def test_the_previous_token_is_refused_after_the_grace_period(client, admin_client, acme):
    rotate_with_the_api(admin_client, acme)
    InstanceConfig.objects.filter(pk=acme.pk).update(
        token_rotated_at=timezone.now() - timedelta(hours=24, seconds=1)
    )

    assert deliver(client, OLD) == 401
    assert deliver(client, NEW) == 200


@override_settings(WEBHOOK_TOKEN_GRACE_HOURS=0)
def test_no_grace_period_accepts_only_the_new_token(client, admin_client, acme):
    rotate_with_the_api(admin_client, acme)

    assert deliver(client, OLD) == 401


def test_only_the_last_replaced_token_is_accepted(client, admin_client, acme):
    rotate_with_the_api(admin_client, acme)
    admin_client.patch(
        "/api/v1/instances/acme/",
        {"webhook_token": "third-token-0003"},
        content_type="application/json",
    )

    assert deliver(client, OLD) == 401
    assert deliver(client, NEW, "WITH-SECOND") == 200
    assert deliver(client, "third-token-0003", "WITH-THIRD") == 200


def test_a_token_set_after_none_keeps_no_earlier_token(client, admin_client, acme):
    rotate_with_the_api(admin_client, acme)
    for token in ("", "fresh-token-0004"):
        admin_client.patch(
            "/api/v1/instances/acme/", {"webhook_token": token}, content_type="application/json"
        )

    assert deliver(client, OLD) == 401
    assert deliver(client, NEW) == 401
    assert deliver(client, "fresh-token-0004") == 200


def test_a_save_that_keeps_the_token_rotates_nothing(acme):
    acme.default_agent = "other"
    acme.save()

    acme.refresh_from_db()
    assert (acme.previous_webhook_token, acme.token_rotated_at) == ("", None)


def test_the_previous_token_is_shown_nowhere(admin_client, acme):
    rotate_with_the_api(admin_client, acme)
    stored = InstanceConfig.objects.get(pk=acme.pk)
    assert stored.previous_webhook_token == OLD

    pages = [
        admin_client.get("/api/v1/instances/").content.decode(),
        admin_client.get("/api/v1/instances/acme/").content.decode(),
        admin_client.get("/api/schema/?format=json").content.decode(),
        admin_client.get(f"/admin/instances/instanceconfig/{acme.pk}/change/").content.decode(),
    ]
    out = StringIO()
    call_command("instances", "show", "acme", "--json", stdout=out)
    call_command("instances", "show", "acme", stdout=out)
    call_command("instances", "list", "--json", stdout=out)

    for text in [*pages, out.getvalue(), repr(stored), str(stored)]:
        assert OLD not in text
    assert "previous_webhook_token" not in pages[0] + pages[1] + pages[2] + out.getvalue()


def test_a_save_of_other_fields_only_records_no_rotation(acme):
    acme.webhook_token = NEW
    acme.default_agent = "other"
    acme.save(update_fields=["default_agent"])

    acme.webhook_token = NEW
    acme.save(update_fields=["webhook_token"])

    acme.refresh_from_db()
    assert (acme.webhook_token, acme.previous_webhook_token) == (NEW, OLD)
    assert acme.token_rotated_at is not None
