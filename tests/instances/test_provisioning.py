"""Provisioning a tenant on a fake Evolution 2.3.7: what is sent, and every failure in words."""

import json
import time
from typing import Any

import pytest
from django.conf import settings

from instances import provisioning
from instances.models import InstanceConfig
from tests.conftest import EVOLUTION_FIXTURES, load_fixture
from tests.fakes import PAIRING_CODE, QR_DATA_URL, FakeOpenAI, Recorded
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
    # The key first (a call Evolution authenticates before anything else),
    # then the create, which carries the webhook: no separate set is needed.
    assert [r.path for r in evolution.requests][:2] == [
        "/instance/fetchInstances?instanceName=acme-wa",
        "/instance/create",
    ]
    [create] = evolution.received("/instance/create")
    assert create.method == "POST"
    assert create.headers["apikey"] == SECRETS["evolution_key"]
    assert create.body == {
        "instanceName": "acme-wa",
        "integration": "WHATSAPP-BAILEYS",
        "qrcode": True,
        "webhook": {
            "url": f"{settings.PUBLIC_BASE_URL}/webhook/evolution/acme",
            "headers": {"X-Webhook-Token": SECRETS["webhook_token"]},
            "events": ["MESSAGES_UPSERT", "MESSAGES_UPDATE", "CONNECTION_UPDATE"],
            "byEvents": False,
            "base64": True,
        },
    }
    assert evolution.received("/webhook/set/") == []
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
    assert evolution.received("/webhook/set/") == []
    assert len(evolution.received("/instance/create")) == 1
    assert len(evolution.received("/webhook/find/")) == 2


def test_an_instance_already_on_evolution_counts_as_existing(acme, evolution):
    evolution.instances["acme-wa"] = {"state": "open", "webhook": None, "connects": 0}

    report = provisioning.provision(instance=acme)

    assert report.ok
    assert outcomes(report) == [("Evolution instance", True, "exists"), ("Webhook", True, "set")]
    assert evolution.received("/instance/create") == []
    assert len(evolution.received("/webhook/set/")) == 1


def test_a_name_taken_between_the_check_and_the_create_counts_as_existing(acme, evolution):
    evolution.instances["acme-wa"] = {"state": "open", "webhook": None, "connects": 0}
    evolution.answer_next("/instance/fetchInstances", (404, {"status": 404}))

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
    assert evolution.received("/instance/create")[0].body["webhook"]["headers"] == {}


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
    paths = [r.path for r in evolution.received("/instance/fetchInstances")]
    assert paths == [
        "/instance/fetchInstances?instanceName=globex",
        "/instance/fetchInstances?instanceName=loja%20acme/1",
    ]


def test_the_legacy_default_instance_is_told_it_needs_evolution_credentials(
    make_instance, evolution
):
    legacy = make_instance(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )

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
            "refuses the instance's Evolution API key (GET /instance/fetchInstances answered 401)",
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
            "Evolution answered 502 Bad Gateway: an HTML page",
            id="non-json-error",
        ),
        pytest.param(
            lambda acme, evolution: evolution.answer_next(
                "/instance/create", (201, b"<html>proxy login</html>")
            ),
            "Evolution answered 201 with a body that is not JSON: an HTML page",
            id="non-json-success",
        ),
    ],
)
def test_every_evolution_failure_becomes_a_readable_message(acme, evolution, setup, expected):
    setup(acme, evolution)

    report = provisioning.provision(instance=acme)

    assert not report.ok
    assert report.configured
    outcome = "bad_key" if "refuses" in expected else "failed"
    assert outcomes(report) == [("Evolution instance", False, outcome)]
    assert expected in report.detail
    assert_no_secret(report.detail)


def test_a_silent_evolution_times_out_with_a_message(acme, evolution, monkeypatch):
    monkeypatch.setattr(provisioning, "TIMEOUT", 0.2)
    monkeypatch.setattr(provisioning, "CREATE_TIMEOUT_SECONDS", 0.2)
    evolution.on("/instance/create", slow(2.0, (201, {})))

    started = time.monotonic()
    report = provisioning.provision(instance=acme)

    assert time.monotonic() - started < 1.5
    assert f"Evolution at {evolution.url} did not answer within 0.2 s" in report.detail


def test_a_failed_webhook_set_keeps_the_first_step(acme, evolution):
    evolution.instances["acme-wa"] = {"state": "close", "webhook": None, "connects": 0}
    evolution.answer_next("/webhook/set/", (500, {"status": 500, "error": "Internal Server Error"}))

    report = provisioning.provision(instance=acme)

    assert outcomes(report) == [
        ("Evolution instance", True, "exists"),
        ("Webhook", False, "failed"),
    ]
    assert report.detail == "Evolution answered 500 Internal Server Error"


def test_an_error_echoing_a_secret_is_scrubbed(acme, evolution):
    evolution.instances["acme-wa"] = {"state": "close", "webhook": None, "connects": 0}
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


def test_the_connection_test_asks_an_openai_server_for_its_models(make_instance, evolution):
    llm = FakeOpenAI(models=("gpt-4o-mini",), api_key=SECRETS["agent_api_key"]).start()
    try:
        instance = make_instance(
            evolution_url=evolution.url,
            agent_kind="openai",
            agent_api_url=f"{llm.url}/v1",
            default_agent="gpt-4o-mini",
            **SECRETS,
        )
        provisioning.provision(instance=instance)

        report = provisioning.test_connections(instance=instance)
    finally:
        llm.stop()

    assert report.ok, report.detail
    assert outcomes(report) == [
        ("Evolution API", True, "close"),
        ("Agent server", True, "reachable"),
    ]
    assert report.steps[1].message == (
        f'The agent server at {llm.url}/v1/models answers and lists the model "gpt-4o-mini".'
    )
    [listing] = llm.requests
    assert (listing.method, listing.path) == ("GET", "/v1/models")
    assert listing.headers["authorization"] == f"Bearer {SECRETS['agent_api_key']}"
    assert_no_secret(" ".join(step.message for step in report.steps))


def test_a_webhook_agent_is_not_called_by_the_connection_test(make_instance, evolution, agent):
    instance = make_instance(
        evolution_url=evolution.url,
        agent_kind="webhook",
        agent_api_url=f"{agent.url}/webhook/whatsapp",
        **SECRETS,
    )
    provisioning.provision(instance=instance)

    report = provisioning.test_connections(instance=instance)

    assert agent.requests == []
    assert report.ok
    assert outcomes(report) == [
        ("Evolution API", True, "close"),
        ("Agent server", True, "not_checked"),
    ]
    assert report.steps[1].label == "Not checked"
    # The summary does not claim the workflow answers.
    assert report.detail.startswith(
        "Evolution answers. A webhook agent cannot be checked without sending it a message"
    )


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


# --- Evolution's own timing, and provisioning that resumes ---


def test_a_create_slower_than_the_other_calls_still_succeeds(acme, evolution, monkeypatch):
    # The real create waits 5 s before answering, half of the 10 s the other
    # calls get; scaled down here: 0.4 s against 0.2 s.
    monkeypatch.setattr(provisioning, "TIMEOUT", 0.2)
    evolution.create_delay = 0.4

    report = provisioning.provision(instance=acme)

    assert report.ok, report.detail
    assert outcomes(report) == [("Evolution instance", True, "created"), ("Webhook", True, "set")]


def test_a_create_whose_answer_never_comes_still_leaves_the_webhook_set(
    acme, evolution, monkeypatch
):
    monkeypatch.setattr(provisioning, "CREATE_TIMEOUT_SECONDS", 0.2)
    evolution.create_delay = 1.0

    report = provisioning.provision(instance=acme)

    assert report.ok, report.detail
    assert outcomes(report) == [("Evolution instance", True, "created"), ("Webhook", True, "set")]
    assert "did not arrive in time" in report.steps[0].message
    webhook = evolution.instances["acme-wa"]["webhook"]
    assert webhook["url"] == f"{settings.PUBLIC_BASE_URL}/webhook/evolution/acme"
    assert webhook["headers"] == {"X-Webhook-Token": SECRETS["webhook_token"]}


def test_a_run_cut_off_in_the_create_is_completed_by_the_next_run(acme, evolution, monkeypatch):
    monkeypatch.setattr(provisioning, "CREATE_TIMEOUT_SECONDS", 0.2)
    evolution.create_delay = 1.0
    # Evolution does not list the instance yet when the first run looks again,
    # and ignored the webhook of the create (as a server before 2.x would).
    evolution.answer_next("/instance/fetchInstances", (404, {}), (404, {}))
    evolution.on("/instance/create", slow(1.0, (201, {})))
    evolution.instances["acme-wa"] = {"state": "close", "webhook": None, "connects": 0}

    first = provisioning.provision(instance=acme)
    evolution.on("/instance/create", None)
    second = provisioning.provision(instance=acme)

    assert not first.ok
    assert "Provision again: it completes what this run left." in first.detail
    assert second.ok, second.detail
    assert outcomes(second) == [("Evolution instance", True, "exists"), ("Webhook", True, "set")]
    assert evolution.instances["acme-wa"]["webhook"]["url"].endswith("/webhook/evolution/acme")


# --- a wrong key reads "wrong key", whatever Evolution checks first ---


def test_provision_with_a_wrong_key_on_an_existing_instance_says_the_key_is_wrong(acme, evolution):
    evolution.instances["acme-wa"] = {"state": "close", "webhook": None, "connects": 0}
    acme.evolution_key = "wrong-key-0000"

    report = provisioning.provision(instance=acme)

    # Evolution answers the create 403 "already in use" before it checks the key.
    assert outcomes(report) == [("Evolution instance", False, "bad_key")]
    assert "refuses the instance's Evolution API key" in report.detail
    assert evolution.received("/instance/create") == []


def test_the_state_of_a_missing_instance_with_a_wrong_key_says_the_key_is_wrong(acme, evolution):
    acme.evolution_key = "wrong-key-0000"

    reports = [
        provisioning.connection_state(instance=acme).message,
        provisioning.fetch_qr(instance=acme).message,
        provisioning.test_connections(instance=acme).steps[0].message,
    ]

    for message in reports:
        assert "refuses the instance's Evolution API key" in message
        assert "provision it first" not in message
    # With the right key, a missing instance still says what to do.
    acme.evolution_key = SECRETS["evolution_key"]
    assert "provision it first" in provisioning.connection_state(instance=acme).message


# --- a webhook that delivers to another tenant of this hub ---


def point_at(evolution, path: str) -> None:
    evolution.instances["acme-wa"] = {
        "state": "open",
        "connects": 0,
        "webhook": {
            "url": f"{settings.PUBLIC_BASE_URL}{path}",
            "headers": {},
            "enabled": True,
            "events": ["MESSAGES_UPSERT"],
            "webhookByEvents": False,
            "webhookBase64": True,
        },
    }


@pytest.mark.parametrize(
    ("path", "owner"),
    [("/webhook/evolution/globex", "globex"), ("/webhook/evolution?token=x", "main")],
)
def test_provision_refuses_to_take_another_tenants_webhook_unless_forced(
    acme, evolution, make_instance, path, owner
):
    make_instance(name="globex")
    make_instance(name="main", is_default=True)
    point_at(evolution, path)

    refused = provisioning.provision(instance=acme)

    assert outcomes(refused) == [
        ("Evolution instance", True, "exists"),
        ("Webhook", False, "claimed"),
    ]
    assert f'tenant "{owner}"' in refused.detail
    assert provisioning.needs_force(refused)
    assert evolution.received("/webhook/set/") == []

    forced = provisioning.provision(instance=acme, force=True)

    assert forced.ok
    assert f"taken over from tenant {owner}" in forced.steps[1].message
    assert evolution.instances["acme-wa"]["webhook"]["url"].endswith("/webhook/evolution/acme")


def test_a_webhook_to_a_tenant_this_hub_does_not_have_is_replaced(acme, evolution):
    point_at(evolution, "/webhook/evolution/deleted-long-ago")

    report = provisioning.provision(instance=acme)

    assert report.ok
    assert outcomes(report)[1] == ("Webhook", True, "set")
