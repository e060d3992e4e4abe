"""Provisioning a tenant on a fake Evolution 2.3.7: what is sent, and every failure in words."""

import json
import time
from typing import Any

import pytest
from django.conf import settings

from instances import provisioning
from instances.models import InstanceConfig
from tests.conftest import EVOLUTION_FIXTURES, load_fixture
from tests.fakes import PAIRING_CODE, QR_DATA_URL, Recorded
from tests.instances.conftest import SECRETS, closed_port_url
from webhooks.ingest import record_delivery
from webhooks.models import InboundMessage


def outcomes(report: Any) -> list[tuple[str, bool, str]]:
    return [(step.name, step.ok, step.outcome) for step in report.steps]


def assert_no_secret(text: str) -> None:
    for name, value in SECRETS.items():
        assert value not in text, name


def test_provision_creates_the_instance_then_sets_the_webhook(acme, evolution):
    report = provisioning.provision(instance=acme)

    assert report.ok, report.detail
    assert outcomes(report) == [
        ("Evolution instance", True, "created"),
        ("Webhook", True, "set"),
    ]
    [create] = evolution.received("/instance/create")
    assert create.method == "POST"
    assert create.headers["apikey"] == SECRETS["evolution_key"]
    assert create.body == {
        "instanceName": "acme-wa",
        "integration": "WHATSAPP-BAILEYS",
        "qrcode": True,
    }
    [webhook] = evolution.received("/webhook/set/")
    assert webhook.path == "/webhook/set/acme-wa"
    assert webhook.body == {
        "webhook": {
            "enabled": True,
            "url": f"{settings.PUBLIC_BASE_URL}/webhook/evolution/acme",
            "headers": {"X-Webhook-Token": SECRETS["webhook_token"]},
            "events": ["MESSAGES_UPSERT", "CONNECTION_UPDATE"],
            "byEvents": False,
            "base64": True,
        }
    }
    assert evolution.instances["acme-wa"]["webhook"]["url"].endswith("/webhook/evolution/acme")
    assert_no_secret(report.detail)


def test_a_second_provision_changes_nothing(acme, evolution):
    provisioning.provision(instance=acme)

    report = provisioning.provision(instance=acme)

    assert report.ok
    assert outcomes(report) == [
        ("Evolution instance", True, "exists"),
        ("Webhook", True, "unchanged"),
    ]
    assert len(evolution.received("/webhook/set/")) == 1
    assert len(evolution.received("/webhook/find/")) == 2


def test_a_name_already_in_use_on_evolution_counts_as_existing(acme, evolution):
    evolution.instances["acme-wa"] = {"state": "open", "webhook": None, "connects": 0}

    report = provisioning.provision(instance=acme)

    assert report.ok
    assert outcomes(report)[0] == ("Evolution instance", True, "exists")
    [create] = evolution.received("/instance/create")
    assert create.status == 403
    assert len(evolution.received("/webhook/set/")) == 1


def test_a_webhook_pointing_elsewhere_is_replaced(acme, evolution):
    provisioning.provision(instance=acme)
    evolution.instances["acme-wa"]["webhook"]["url"] = "https://old-hub.example.com/hook"

    report = provisioning.provision(instance=acme)

    assert outcomes(report)[1] == ("Webhook", True, "set")
    assert evolution.instances["acme-wa"]["webhook"]["url"].startswith(settings.PUBLIC_BASE_URL)


def test_a_rotated_token_is_sent_again(acme, evolution):
    provisioning.provision(instance=acme)
    acme.webhook_token = "rotated-token-000000"

    report = provisioning.provision(instance=acme)

    assert outcomes(report)[1] == ("Webhook", True, "set")
    stored = evolution.instances["acme-wa"]["webhook"]["headers"]
    assert stored == {"X-Webhook-Token": "rotated-token-000000"}


def test_an_instance_without_a_token_gets_a_webhook_without_the_header(
    make_instance, evolution, agent
):
    instance = make_instance(
        evolution_url=evolution.url,
        evolution_key=SECRETS["evolution_key"],
        agent_api_url=agent.url,
        webhook_token="",
    )

    report = provisioning.provision(instance=instance)

    assert report.ok
    assert "without a token header" in report.detail
    assert evolution.received("/webhook/set/")[0].body["webhook"]["headers"] == {}


def test_the_whatsapp_name_defaults_to_the_instance_name_and_is_quoted(
    make_instance, evolution, agent
):
    plain = make_instance(
        name="globex",
        whatsapp_instance="",
        evolution_url=evolution.url,
        evolution_key=SECRETS["evolution_key"],
        agent_api_url=agent.url,
    )
    spaced = make_instance(
        name="initech",
        whatsapp_instance="loja acme/1",
        evolution_url=evolution.url,
        evolution_key=SECRETS["evolution_key"],
        agent_api_url=agent.url,
    )

    assert provisioning.provision(instance=plain).ok
    assert provisioning.provision(instance=spaced).ok

    assert set(evolution.instances) == {"globex", "loja acme/1"}
    paths = [r.path for r in evolution.received("/webhook/set/")]
    assert paths == ["/webhook/set/globex", "/webhook/set/loja%20acme%2F1"]


def test_the_legacy_default_instance_is_told_it_needs_evolution_credentials(
    make_instance, evolution
):
    legacy = make_instance(name="default", is_default=True, evolution_url="", evolution_key="")

    reports = [
        provisioning.provision(instance=legacy),
        provisioning.fetch_qr(instance=legacy),
        provisioning.connection_state(instance=legacy),
    ]

    for report in reports:
        assert not report.ok
        assert not report.configured
    assert "needs an Evolution URL and key" in reports[0].detail
    assert reports[1].message == reports[2].message == provisioning.NOT_CONFIGURED
    assert evolution.requests == []


def slow(seconds: float, answer: tuple[int, Any]) -> Any:
    def respond(record: Recorded) -> tuple[int, Any]:
        time.sleep(seconds)
        return answer

    return respond


def error_body(name: str) -> dict[str, Any]:
    return json.loads((EVOLUTION_FIXTURES / "api" / name).read_text())


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        pytest.param(
            lambda acme, evolution: setattr(acme, "evolution_key", "wrong-key-0000"),
            "Evolution answered 401 Unauthorized (check the instance's Evolution API key)",
            id="401-wrong-key",
        ),
        pytest.param(
            lambda acme, evolution: setattr(evolution, "license_required", True),
            "Evolution answered 503 Service Unavailable: service not activated "
            "(LICENSE_REQUIRED): this Evolution server needs a license",
            id="503-license",
        ),
        pytest.param(
            lambda acme, evolution: evolution.answer_next(
                "/instance/create", (400, error_body("error-400-validation.json"))
            ),
            'Evolution answered 400 Bad Request: instance requires property "text"',
            id="400",
        ),
        pytest.param(
            lambda acme, evolution: setattr(acme, "evolution_url", closed_port_url()),
            "Connection refused",
            id="refused",
        ),
        pytest.param(
            lambda acme, evolution: evolution.answer_next(
                "/instance/create", (502, b"<html><body>Bad Gateway</body></html>")
            ),
            "Evolution answered 502 Bad Gateway: <html><body>Bad Gateway</body></html>",
            id="non-json-error",
        ),
        pytest.param(
            lambda acme, evolution: evolution.answer_next(
                "/instance/create", (201, b"<html>proxy login</html>")
            ),
            "Evolution answered 201 with a body that is not JSON: <html>proxy login</html>",
            id="non-json-success",
        ),
    ],
)
def test_every_evolution_failure_becomes_a_readable_message(acme, evolution, setup, expected):
    setup(acme, evolution)

    report = provisioning.provision(instance=acme)

    assert not report.ok
    assert report.configured
    assert outcomes(report) == [("Evolution instance", False, "failed")]
    assert expected in report.detail
    assert_no_secret(report.detail)


def test_a_silent_evolution_times_out_with_a_message(acme, evolution, monkeypatch):
    monkeypatch.setattr(provisioning, "TIMEOUT", 0.2)
    evolution.on("/instance/create", slow(2.0, (201, {})))

    started = time.monotonic()
    report = provisioning.provision(instance=acme)

    assert time.monotonic() - started < 1.5
    assert f"Evolution at {evolution.url} did not answer within 0.2 s" in report.detail


def test_a_failed_webhook_set_keeps_the_created_step(acme, evolution):
    evolution.answer_next("/webhook/set/", (500, {"status": 500, "error": "Internal Server Error"}))

    report = provisioning.provision(instance=acme)

    assert outcomes(report) == [
        ("Evolution instance", True, "created"),
        ("Webhook", False, "failed"),
    ]
    assert report.detail == "Evolution answered 500 Internal Server Error"


def test_an_error_echoing_a_secret_is_scrubbed(acme, evolution):
    echo = {"status": 400, "response": {"message": [f"bad header {SECRETS['webhook_token']}"]}}
    evolution.answer_next("/webhook/set/", (400, echo))

    report = provisioning.provision(instance=acme)

    assert "bad header [hidden]" in report.detail
    assert_no_secret(report.detail)


def test_the_connection_state_comes_from_evolution(acme, evolution):
    provisioning.provision(instance=acme)
    assert provisioning.connection_state(instance=acme).state == "close"

    evolution.open_session("acme-wa")
    report = provisioning.connection_state(instance=acme)

    assert report.ok and report.connected
    assert report.state == "open"
    assert evolution.received("/instance/connectionState/acme-wa")[-1].method == "GET"


def test_the_state_of_an_instance_missing_on_evolution_says_to_provision(acme, evolution):
    report = provisioning.connection_state(instance=acme)

    assert not report.ok
    assert 'Evolution answered 404 Not Found: The "acme-wa" instance does not exist' in (
        report.message
    )
    assert "provision it first" in report.message


def test_the_qr_code_is_missing_at_first_then_shown(acme, evolution):
    provisioning.provision(instance=acme)

    first = provisioning.fetch_qr(instance=acme)
    second = provisioning.fetch_qr(instance=acme)

    assert first.ok and first.qr_code is None and first.pairing_code is None
    assert first.message == (
        "No QR code available yet — Evolution is still starting the session; "
        "this page keeps trying."
    )
    assert second.qr_code == QR_DATA_URL
    assert second.pairing_code == PAIRING_CODE
    assert second.state == "connecting"
    assert not second.connected


def test_an_open_session_needs_no_qr_code(acme, evolution):
    provisioning.provision(instance=acme)
    evolution.open_session("acme-wa")

    report = provisioning.fetch_qr(instance=acme)

    assert report.connected
    assert report.message == "Connected"
    assert report.qr_code is None
    assert evolution.received("/instance/connect/") == []


def test_the_qr_code_of_an_unknown_instance_is_an_error(acme):
    report = provisioning.fetch_qr(instance=acme)

    assert not report.ok
    assert "does not exist" in report.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("data:image/png;base64,iVBOR", "data:image/png;base64,iVBOR"),
        ("iVBORw0KGgo=", "data:image/png;base64,iVBORw0KGgo="),
        ("javascript:alert(1)", None),
        ("data:text/html;base64,PHNjcmlwdD4=", None),
        ("", None),
        (None, None),
    ],
)
def test_only_an_image_becomes_the_qr_code(value, expected):
    assert provisioning.qr_data_url(value) == expected


def test_the_connection_test_checks_evolution_and_the_agent_health(acme, evolution, agent):
    provisioning.provision(instance=acme)

    report = provisioning.test_connections(instance=acme)

    assert report.ok, report.detail
    assert report.state == "close"
    assert outcomes(report) == [
        ("Evolution API", True, "close"),
        ("Agent server", True, "reachable"),
    ]
    [health] = agent.requests
    # A GET on /health: the agent is never run by a test.
    assert (health.method, health.path) == ("GET", "/health")
    assert health.headers["x-api-key"] == SECRETS["agent_api_key"]
    assert_no_secret(" ".join(step.message for step in report.steps))


@pytest.mark.parametrize("status", [401, 403])
def test_an_agent_refusing_the_key_is_a_bad_key(acme, evolution, agent, status):
    agent.failure = (status, {"detail": "Invalid API key"})

    report = provisioning.test_connections(instance=acme)

    agent_step = report.steps[1]
    assert (agent_step.ok, agent_step.outcome) == (False, "bad_key")
    assert f"answered {status}: it refuses the instance's agent API key" in agent_step.message


def test_any_other_agent_answer_means_reachable(acme, evolution, agent):
    agent.failure = (404, {"detail": "Not Found"})

    report = provisioning.test_connections(instance=acme)

    assert report.steps[1].ok
    assert "(HTTP 404)" in report.steps[1].message


def test_unreachable_servers_fail_the_test_with_their_reasons(make_instance):
    instance = make_instance(
        evolution_url=closed_port_url(), agent_api_url=closed_port_url(), **SECRETS
    )

    report = provisioning.test_connections(instance=instance)

    assert not report.ok
    assert outcomes(report) == [
        ("Evolution API", False, "failed"),
        ("Agent server", False, "failed"),
    ]
    assert "Could not reach Evolution at" in report.detail
    assert "Could not reach the agent server at" in report.detail
    assert report.detail.count("Connection refused") == 2


def test_the_activity_annotation_gives_the_last_message_time(acme):
    assert provisioning.with_activity(InstanceConfig.objects.all()).get().last_message_at is None
    record_delivery(instance=acme, body=load_fixture("messages-upsert-text.json"))
    received = InboundMessage.objects.get().received_at

    annotated = provisioning.with_activity(InstanceConfig.objects.all()).get()

    assert annotated.last_message_at == received
    assert provisioning.last_message_at(acme) == received
