"""/api/v1/instances/{name}/status|provision|qr|test/ against a fake Evolution."""

import pytest
from django.conf import settings
from django.test import Client

from tests.conftest import load_fixture
from tests.fakes import PAIRING_CODE, QR_DATA_URL, FakeOpenAI
from tests.instances.conftest import SECRETS, break_evolution_cases
from webhooks.ingest import record_delivery
from webhooks.models import ConnectionState, InboundMessage

BASE = "/api/v1/instances/acme"
ENDPOINTS = [("get", "status"), ("post", "provision"), ("get", "qr"), ("post", "test")]


@pytest.fixture
def api(client: Client, db: None) -> Client:
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY
    return client


def call(api: Client, method: str, endpoint: str, name: str = "acme"):
    response = getattr(api, method)(f"/api/v1/instances/{name}/{endpoint}/")
    for value in SECRETS.values():
        assert value not in response.content.decode(), endpoint
    return response


def test_provision_creates_and_sets_the_webhook_then_changes_nothing(api, acme, evolution):
    first = call(api, "post", "provision")
    second = call(api, "post", "provision")

    assert first.status_code == 200
    body = first.json()
    assert body["ok"] is True
    assert [(s["name"], s["outcome"]) for s in body["steps"]] == [
        ("Evolution instance", "created"),
        ("Webhook", "set"),
    ]
    [create] = evolution.received("/instance/create")
    assert create.body["webhook"]["url"] == f"{settings.PUBLIC_BASE_URL}/webhook/evolution/acme"
    assert create.body["webhook"]["events"] == [
        "MESSAGES_UPSERT",
        "MESSAGES_UPDATE",
        "CONNECTION_UPDATE",
    ]
    assert create.body["webhook"]["headers"] == {"X-Webhook-Token": SECRETS["webhook_token"]}
    assert second.status_code == 200
    assert [s["outcome"] for s in second.json()["steps"]] == ["exists", "unchanged"]


@pytest.mark.parametrize(("break_it", "detail"), break_evolution_cases())
def test_a_failed_provision_answers_502_with_the_reason(api, acme, evolution, break_it, detail):
    break_it(acme, evolution)
    acme.save()

    response = call(api, "post", "provision")

    assert response.status_code == 502
    body = response.json()
    assert body["ok"] is False
    assert detail in body["detail"]
    assert body["steps"][-1]["ok"] is False


def test_a_partial_provision_shows_what_was_done(api, acme, evolution):
    evolution.instances["acme-wa"] = {"state": "close", "webhook": None, "connects": 0}
    evolution.answer_next("/webhook/set/", (500, {"status": 500, "error": "Internal Server Error"}))

    response = call(api, "post", "provision")

    assert response.status_code == 502
    assert [(s["outcome"], s["ok"]) for s in response.json()["steps"]] == [
        ("exists", True),
        ("failed", False),
    ]


def test_the_legacy_default_instance_answers_409(api, make_instance, evolution):
    make_instance(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )

    for method, endpoint in [("get", "status"), ("post", "provision"), ("get", "qr")]:
        response = call(api, method, endpoint, name="default")
        assert response.status_code == 409, endpoint
        assert response.json()["ok"] is False
        assert "Provisioning needs an Evolution URL and key" in response.json()["detail"]
    test = call(api, "post", "test", name="default")
    assert test.status_code == 200
    assert test.json()["steps"][0]["outcome"] == "not_configured"
    assert evolution.requests == []


def test_the_status_gives_the_live_state_and_what_the_hub_saw(api, acme, evolution):
    call(api, "post", "provision")
    before = call(api, "get", "status").json()
    evolution.open_session("acme-wa")
    ConnectionState.objects.create(instance=acme, state="open")
    record_delivery(instance=acme, body=load_fixture("messages-upsert-text.json"))

    response = call(api, "get", "status")

    assert before["state"] == "close"
    assert before["last_connection_update"] is None
    assert before["last_message_at"] is None
    assert response.status_code == 200
    body = response.json()
    assert (body["ok"], body["state"], body["connected"]) == (True, "open", True)
    assert body["detail"] == 'The WhatsApp session is in state "open".'
    assert body["last_connection_update"]["state"] == "open"
    received = InboundMessage.objects.get().received_at
    assert body["last_message_at"] == received.isoformat().replace("+00:00", "Z")


def test_the_status_of_an_instance_missing_on_evolution_answers_502(api, acme):
    response = call(api, "get", "status")

    assert response.status_code == 502
    assert response.json() == {
        "ok": False,
        "detail": 'Evolution answered 404 Not Found: The "acme-wa" instance does not exist. '
        'Evolution has no instance "acme-wa": provision it first.',
    }


def test_the_qr_endpoint_says_when_there_is_no_code_then_gives_it(api, acme, evolution):
    call(api, "post", "provision")

    waiting = call(api, "get", "qr")
    showing = call(api, "get", "qr")
    evolution.open_session("acme-wa")
    connected = call(api, "get", "qr")

    assert waiting.status_code == 200
    assert waiting.json()["qr_code"] is None
    assert waiting.json()["detail"].startswith("No QR code available yet")
    assert showing.json()["qr_code"] == QR_DATA_URL
    assert showing.json()["pairing_code"] == PAIRING_CODE
    assert connected.json() == {
        "ok": True,
        "detail": "Connected",
        "state": "open",
        "connected": True,
        "qr_code": None,
        "pairing_code": None,
    }


def test_the_connection_test_answers_200_either_way(api, acme, evolution, agent):
    call(api, "post", "provision")
    good = call(api, "post", "test")
    agent.failure = (401, {"detail": "bad key"})
    evolution.license_required = True
    bad = call(api, "post", "test")

    assert good.status_code == bad.status_code == 200
    assert good.json()["ok"] is True
    assert good.json()["state"] == "close"
    body = bad.json()
    assert body["ok"] is False
    assert body["state"] is None
    assert [(s["name"], s["outcome"]) for s in body["steps"]] == [
        ("Evolution API", "failed"),
        ("Agent server", "bad_key"),
    ]
    assert "LICENSE_REQUIRED" in body["detail"]
    assert all(r.path == "/health" for r in agent.requests)


@pytest.fixture
def llm():
    server = FakeOpenAI(models=("llama3.2:latest", "qwen3:8b")).start()
    yield server
    server.stop()


def test_the_connection_test_of_an_openai_instance_reports_its_model_check(
    api, make_instance, evolution, llm
):
    make_instance(
        evolution_url=evolution.url,
        agent_kind="openai",
        agent_api_url=f"{llm.url}/v1",
        agent_api_key="",
        default_agent="llama3.2",
        **{k: v for k, v in SECRETS.items() if k != "agent_api_key"},
    )
    call(api, "post", "provision")

    listed = call(api, "post", "test").json()
    llm.models = ["qwen3:8b"]
    missing = call(api, "post", "test").json()

    assert listed["ok"] is True
    assert listed["steps"][1] == {
        "name": "Agent server",
        "ok": True,
        "outcome": "reachable",
        "message": f"The agent server at {llm.url}/v1/models answers and lists the model "
        '"llama3.2".',
    }
    assert missing["ok"] is False
    assert missing["steps"][1]["outcome"] == "no_model"
    assert 'does not have the model "llama3.2"' in missing["detail"]
    assert 'it lists "qwen3:8b"' in missing["detail"]
    # The models list only, and no key header for a keyless (local) server.
    assert [(r.method, r.path) for r in llm.requests] == [("GET", "/v1/models")] * 2
    assert all("authorization" not in r.headers for r in llm.requests)


@pytest.mark.parametrize(("method", "endpoint"), ENDPOINTS)
def test_the_endpoints_need_authentication(client, acme, evolution, method, endpoint):
    response = call(client, method, endpoint)

    assert response.status_code == 401
    assert evolution.requests == []


@pytest.mark.parametrize(("method", "endpoint"), ENDPOINTS)
def test_an_unknown_instance_answers_404(api, method, endpoint):
    assert call(api, method, endpoint, name="nobody").status_code == 404


def test_the_schema_documents_the_provisioning_operations(client, db):
    paths = client.get("/api/schema/?format=json").json()["paths"]

    for method, endpoint in ENDPOINTS:
        operation = paths[f"/api/v1/instances/{{name}}/{endpoint}/"][method]
        codes = set(operation["responses"])
        expected = (
            {"200", "401", "403", "404"}
            if endpoint == "test"
            else {"200", "401", "403", "404", "409", "502"}
        )
        assert codes == expected, endpoint
        assert "requestBody" not in operation
    qr = paths["/api/v1/instances/{name}/qr/"]["get"]["responses"]["200"]
    assert qr["content"]["application/json"]["schema"]["$ref"].endswith("/Qr")


def test_provision_takes_another_tenants_webhook_only_with_force(
    api, acme, evolution, make_instance
):
    make_instance(name="globex")
    provisioning_url = f"{settings.PUBLIC_BASE_URL}/webhook/evolution/globex"
    evolution.instances["acme-wa"] = {
        "state": "open",
        "connects": 0,
        "webhook": {"url": provisioning_url, "enabled": True, "events": []},
    }

    refused = call(api, "post", "provision")
    forced = api.post("/api/v1/instances/acme/provision/?force=true")

    assert refused.status_code == 502
    assert refused.json()["steps"][-1]["outcome"] == "claimed"
    assert forced.status_code == 200
    assert evolution.instances["acme-wa"]["webhook"]["url"].endswith("/webhook/evolution/acme")


def test_the_connection_test_checks_each_routing_agent_in_its_own_way(
    api, acme, evolution, agent, llm
):
    from instances.models import Agent
    from instances.services import save_agent

    save_agent(
        agent=Agent(
            instance=acme,
            name="sales",
            agent_kind="openai",
            agent_api_url=f"{llm.url}/v1",
            default_agent="qwen3:8b",
        )
    )
    call(api, "post", "provision")

    body = call(api, "post", "test").json()

    assert [(s["name"], s["outcome"]) for s in body["steps"]] == [
        ("Evolution API", "close"),
        ("Agent server", "reachable"),
        ('Agent "sales"', "reachable"),
    ]
    assert body["ok"] is True
    assert body["detail"] == "Evolution and every agent answer."
    assert [(r.method, r.path) for r in llm.requests] == [("GET", "/v1/models")]
