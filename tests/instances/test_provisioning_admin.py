"""The admin's provisioning pages, actions and list columns, against a fake Evolution."""

import re

import pytest
from django.test import Client
from django.utils import formats, timezone
from django.utils.html import escape

from instances.models import InstanceConfig
from tests.conftest import load_fixture
from tests.fakes import PAIRING_CODE, QR_DATA_URL
from tests.instances.conftest import SECRETS, break_evolution_cases
from webhooks.ingest import record_delivery
from webhooks.models import ConnectionState, InboundMessage

CHANGELIST = "/admin/instances/instanceconfig/"
NO_QR_YET = (
    "No QR code available yet — Evolution is still starting the session; this page keeps trying."
)


def page(instance: InstanceConfig, suffix: str) -> str:
    return f"{CHANGELIST}{instance.pk}/{suffix}"


def text(response) -> str:
    return response.content.decode()


def assert_no_secret(content: str) -> None:
    for name, value in SECRETS.items():
        assert value not in content, name


def test_the_change_page_has_the_three_buttons(admin_client: Client, acme):
    html = text(admin_client.get(page(acme, "change/")))

    for label, suffix in [
        ("Test connections", "test-connections/"),
        ("Provision on Evolution", "provision/"),
        ("Connect WhatsApp (QR code)", "qr/"),
    ]:
        assert f'<a href="{page(acme, suffix)}">{label}</a>' in html


def test_the_connection_test_page_shows_each_step(admin_client: Client, acme, agent):
    response = admin_client.get(page(acme, "test-connections/"))

    assert response.status_code == 200
    html = text(response)
    assert "Evolution API" in html and "Agent server" in html
    # Nothing is provisioned yet: Evolution says so, in words.
    assert "The &quot;acme-wa&quot; instance does not exist" in html
    assert "provision it first" in html
    assert f"The agent server at {agent.url}/health answers (HTTP 200)." in html
    assert_no_secret(html)


def test_the_connection_test_page_says_a_webhook_agent_is_not_called(
    admin_client: Client, make_instance, evolution, agent
):
    flow = make_instance(
        evolution_url=evolution.url,
        agent_kind="webhook",
        agent_api_url=f"{agent.url}/webhook/whatsapp",
        **SECRETS,
    )

    html = text(admin_client.get(page(flow, "test-connections/")))

    assert agent.requests == []
    assert "Not checked" in html
    assert "A webhook agent cannot be checked without sending it a message" in html
    assert_no_secret(html)


def test_the_provision_page_asks_first_and_calls_nothing(admin_client: Client, acme, evolution):
    response = admin_client.get(page(acme, "provision/"))

    html = text(response)
    assert response.status_code == 200
    assert "Create the instance &quot;acme-wa&quot; on Evolution" in html
    assert "/webhook/evolution/acme for MESSAGES_UPSERT, MESSAGES_UPDATE, CONNECTION_UPDATE" in html
    assert 'value="Provision now"' in html
    assert evolution.requests == []
    assert_no_secret(html)


def test_posting_the_provision_page_provisions_and_shows_the_steps(
    admin_client: Client, acme, evolution
):
    response = admin_client.post(page(acme, "provision/"))

    html = text(response)
    assert response.status_code == 200
    assert "Created instance &quot;acme-wa&quot; on Evolution." in html
    assert "Webhook set: http://127.0.0.1:8000/webhook/evolution/acme" in html
    assert evolution.instances["acme-wa"]["webhook"]["headers"] == {
        "X-Webhook-Token": SECRETS["webhook_token"]
    }
    assert_no_secret(html)

    again = text(admin_client.post(page(acme, "provision/")))
    assert "already exists on Evolution; left as it is." in again
    assert "Webhook already set" in again


@pytest.mark.parametrize(("break_it", "message"), break_evolution_cases())
def test_a_failed_provision_shows_the_error_on_the_page(
    admin_client: Client, acme, evolution, break_it, message
):
    break_it(acme, evolution)
    acme.save()

    response = admin_client.post(page(acme, "provision/"))

    assert response.status_code == 200
    html = text(response)
    assert "Failed:" in html
    assert escape(message) in html
    assert_no_secret(html)


def test_the_legacy_default_instance_gets_a_clear_message(admin_client: Client, make_instance):
    legacy = make_instance(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )

    for suffix in ("provision/", "qr/"):
        html = text(admin_client.get(page(legacy, suffix)))
        assert "Provisioning needs an Evolution URL and key" in html, suffix
    assert 'value="Provision now"' not in text(admin_client.get(page(legacy, "provision/")))


def test_the_qr_page_says_plainly_when_there_is_no_qr_code_yet(
    admin_client: Client, acme, evolution
):
    admin_client.post(page(acme, "provision/"))

    html = text(admin_client.get(page(acme, "qr/")))

    assert NO_QR_YET in html
    assert 'id="qr-image" alt="WhatsApp QR code" width="264" height="264" hidden' in html
    # The state Evolution gave before the connect call started the session.
    assert 'id="qr-state">close<' in html


def test_the_qr_page_shows_the_qr_code_pairing_code_and_state(
    admin_client: Client, acme, evolution
):
    admin_client.post(page(acme, "provision/"))
    admin_client.get(page(acme, "qr/"))

    response = admin_client.get(page(acme, "qr/"))

    html = text(response)
    assert response.status_code == 200
    assert f'src="{QR_DATA_URL}"' in html
    assert PAIRING_CODE in html
    assert 'id="qr-state">connecting<' in html
    # It polls its JSON endpoint every 3 s until the state is "open".
    assert f'data-poll-url="{page(acme, "qr/status/")}"' in html
    assert 'data-poll="yes"' in html
    assert "window.setTimeout(poll, 3000)" in html
    assert_no_secret(html)


def test_the_qr_status_endpoint_follows_the_session_until_connected(
    admin_client: Client, acme, evolution
):
    admin_client.post(page(acme, "provision/"))
    url = page(acme, "qr/status/")

    waiting = admin_client.get(url).json()
    showing = admin_client.get(url).json()
    evolution.open_session("acme-wa")
    connected = admin_client.get(url).json()

    assert (waiting["qr_code"], waiting["message"]) == (None, NO_QR_YET)
    assert showing["qr_code"] == QR_DATA_URL
    assert showing["pairing_code"] == PAIRING_CODE
    assert connected == {
        "ok": True,
        "configured": True,
        "state": "open",
        "connected": True,
        "qr_code": None,
        "pairing_code": None,
        "message": "Connected",
    }
    open_page = text(admin_client.get(page(acme, "qr/")))
    assert ">Connected<" in open_page
    assert 'data-poll="no"' in open_page


def test_the_qr_page_of_an_instance_unknown_to_evolution_shows_the_error(
    admin_client: Client, acme
):
    response = admin_client.get(page(acme, "qr/"))

    assert response.status_code == 200
    assert "The &quot;acme-wa&quot; instance does not exist" in text(response)


def test_the_pages_need_a_staff_login(client: Client, acme):
    for suffix in ("test-connections/", "provision/", "qr/", "qr/status/"):
        response = client.get(page(acme, suffix))
        assert response.status_code == 302, suffix
        assert "/admin/login/" in response["Location"]


def test_an_unknown_instance_redirects_to_the_list(admin_client: Client, db):
    response = admin_client.get(f"{CHANGELIST}999/provision/")

    assert response.status_code == 302
    assert admin_client.get(f"{CHANGELIST}999/qr/status/").status_code == 404


def test_the_provision_action_reports_each_instance(admin_client: Client, acme, make_instance):
    legacy = make_instance(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )

    response = admin_client.post(
        CHANGELIST,
        {"action": "provision_selected", "_selected_action": [acme.pk, legacy.pk], "index": "0"},
        follow=True,
    )

    messages = [str(m) for m in response.context["messages"]]
    assert any(
        m.startswith("Provisioning of acme: Created instance") and "Webhook set" in m
        for m in messages
    )
    assert any(m.startswith("Provisioning of default: Provisioning needs") for m in messages)
    assert_no_secret(text(response))


def test_the_test_action_reports_each_instance(admin_client: Client, acme):
    response = admin_client.post(
        CHANGELIST,
        {"action": "test_selected", "_selected_action": [acme.pk], "index": "0"},
        follow=True,
    )

    [message] = [m for m in response.context["messages"] if "Test of" in str(m)]
    assert message.level_tag == "error"
    assert "instance does not exist" in str(message)


def row_of(html: str, name: str) -> str:
    [row] = [row for row in html.split("<tr")[1:] if f">{name}</a>" in row]
    return row


def test_the_list_shows_connection_state_and_last_message(
    admin_client: Client, acme, make_instance
):
    make_instance(name="quiet")
    ConnectionState.objects.create(instance=acme, state="open")
    record_delivery(instance=acme, body=load_fixture("messages-upsert-text.json"))
    received = timezone.localtime(InboundMessage.objects.get().received_at)

    response = admin_client.get(CHANGELIST)

    html = text(response)
    assert '<th scope="col" class="sortable column-connection_state">' in html
    assert '<th scope="col" class="sortable column-last_message">' in html
    acme_row, quiet_row = row_of(html, "acme"), row_of(html, "quiet")
    assert '<td class="field-connection_state">open</td>' in acme_row
    assert '<td class="field-connection_state">—</td>' in quiet_row
    assert '<td class="field-last_message">—</td>' in quiet_row
    shown = re.search(r'field-last_message[^"]*">([^<]*)<', acme_row)
    assert shown is not None
    assert shown.group(1) == formats.localize(received)


def test_the_list_does_not_query_per_row(
    admin_client: Client, make_instance, django_assert_max_num_queries
):
    make_instance(name="one")
    admin_client.get(CHANGELIST)  # warm up: session, content types
    with django_assert_max_num_queries(12) as few:
        admin_client.get(CHANGELIST)
    for name in ("two", "three", "four", "five"):
        instance = make_instance(name=name)
        ConnectionState.objects.create(instance=instance, state="close")
        record_delivery(instance=instance, body=load_fixture("messages-upsert-text.json"))

    with django_assert_max_num_queries(len(few.captured_queries)):
        response = admin_client.get(CHANGELIST)

    assert len(response.context["cl"].result_list) == 5


def test_a_delete_still_works_with_the_annotated_list(admin_client: Client, acme):
    response = admin_client.post(
        CHANGELIST,
        {"action": "delete_selected", "_selected_action": [acme.pk], "post": "yes"},
    )

    assert response.status_code == 302
    assert not InstanceConfig.objects.exists()


def test_the_provision_page_offers_to_take_another_tenants_webhook_over(
    admin_client: Client, acme, evolution, make_instance
):
    from django.conf import settings

    make_instance(name="globex")
    evolution.instances["acme-wa"] = {
        "state": "open",
        "connects": 0,
        "webhook": {
            "url": f"{settings.PUBLIC_BASE_URL}/webhook/evolution/globex",
            "enabled": True,
            "events": [],
        },
    }

    refused = text(admin_client.post(page(acme, "provision/")))
    forced = text(admin_client.post(page(acme, "provision/"), {"force": "1"}))

    assert "Provision anyway: take the webhook over" in refused
    assert escape('tenant "globex"') in refused
    assert "Provision anyway" not in forced
    assert evolution.instances["acme-wa"]["webhook"]["url"].endswith("/webhook/evolution/acme")
