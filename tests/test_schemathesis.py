"""The REST API against its own OpenAPI schema (schemathesis).

Every operation gets generated requests, valid ones and schema-violating ones,
on a database holding real tenants and messages: none may answer 5xx, and every
answer must be documented (status code, content type, body schema). A table of
hand-written requests then reaches every status code the schema documents, so
each documented answer is checked against its schema at least once.

schemathesis' pytest integration (`schema.parametrize()`) is not used: under
pytest 9 it gives every generated test the same node id. The operations are
parametrized here instead, each a Hypothesis run over schemathesis' strategies.
"""

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, transaction
from django.test import Client, RequestFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode, checks

from instances.models import Agent, Route
from instances.send_keys import create_send_key
from omnihub import errors
from tests.conftest import load_fixture
from tests.fakes import FakeAgent, FakeEvolution
from webhooks import outbox
from webhooks.ingest import record_delivery
from webhooks.models import Conversation, InboundMessage, Status

API_KEY = "test-api-key"  # OMNIHUB_API_KEY of omnihub.test_settings
SCHEMA = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
# not_a_server_error is the assertion in the tests instead: the provisioning
# actions document 502 for "Evolution failed" (status_code_conformance checks that).
CHECKS = [
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
BAD_GATEWAY = 502
# Per operation and generation mode: the whole file runs in about 20 s.
HYPOTHESIS = settings(
    max_examples=15,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
AUTH = {
    "api key": {"x-api-key": API_KEY},
    "wrong key": {"x-api-key": "not-the-key"},
    "none": {},
}
NO_ROUTE = {"detail": "Not found."}
EVOLUTION_KEY = "schemathesis-evolution-key"
WHATSAPP_NAME = "acme-wa"


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class Existing:
    """What the path parameters can point at."""

    names: list[str]
    message_ids: dict[Status, str] = field(default_factory=dict)
    conversation_id: str = ""
    route_id: str = ""
    send_key_id: str = ""
    outbound_id: str = ""

    def paths(self, params: list[str]) -> list[dict[str, str]]:
        """Path parameters that name existing objects."""
        if params == ["name"]:
            return [{"name": name} for name in self.names]
        if params == ["id"]:
            return [{"id": i} for i in [*self.message_ids.values(), self.conversation_id]]
        # An instance's agents and routing rules.
        found = {"instance_name": "acme", "name": "sales", "id": self.route_id}
        return [{param: found[param] for param in params}]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeEvolution, FakeAgent]]:
    evolution = FakeEvolution(api_key=EVOLUTION_KEY).start()
    agent = FakeAgent().start()
    yield evolution, agent
    evolution.stop()
    agent.stop()


@pytest.fixture
def requests_keep_the_test_connection() -> Iterator[None]:
    """Django's WSGI handler closes the connection after each request (the test client
    does not): on PostgreSQL that would end the test's transaction half-way."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def existing(
    db: None,
    requests_keep_the_test_connection: None,
    upstreams: tuple[FakeEvolution, FakeAgent],
    make_instance,
) -> Existing:
    evolution, agent = upstreams
    # Known to Evolution and linked to a phone: status, qr, provision and test answer 200.
    evolution.instances[WHATSAPP_NAME] = {"state": "open", "webhook": None, "connects": 0}
    acme = make_instance(
        evolution_url=evolution.url,
        evolution_key=EVOLUTION_KEY,
        whatsapp_instance=WHATSAPP_NAME,
        agent_api_url=agent.url,
    )
    # Evolution refuses the connection at once: the 502 answers.
    make_instance(name="down", evolution_url=closed_port_url(), agent_api_url=closed_port_url())
    # The legacy default has no Evolution of its own: the 409 answers.
    make_instance(
        name="legacy", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )
    existing = Existing(names=["acme", "down", "legacy"])
    for status in Status:
        body = load_fixture("messages-upsert-text.json")
        body["data"]["key"]["id"] = f"SCHEMATHESIS-{status}"
        record_delivery(instance=acme, body=body)
        row = InboundMessage.objects.get(message_id=f"SCHEMATHESIS-{status}")
        InboundMessage.objects.filter(pk=row.pk).update(
            status=status,
            reply_text="Olá" if status == Status.REPLIED else None,
            last_error="agent unreachable" if status == Status.FAILED else "",
        )
        existing.message_ids[status] = str(row.pk)
    existing.conversation_id = str(Conversation.objects.get(instance=acme).pk)
    # Routing: "sales" has a rule pointing at it, "idle" none (it can be deleted).
    sales = Agent.objects.create(
        instance=acme, name="sales", agent_api_url=agent.url, agent_api_key="sales-key"
    )
    Agent.objects.create(instance=acme, name="idle", agent_kind="webhook", agent_api_url=agent.url)
    route = Route.objects.create(instance=acme, match="keyword", value="vendas", agent=sales)
    existing.route_id = str(route.pk)
    existing.send_key_id = str(create_send_key(instance=acme, name="crm")[0].pk)
    # The send API: one message queued with a known idempotency key.
    queued = outbox.queue_send(
        instance=acme,
        chat_jid=SEND["to"] + "@s.whatsapp.net",
        text=SEND["text"],
        idempotency_key=SEND["idempotency_key"],
        body_hash=outbox.request_hash(
            {
                "to": SEND["to"] + "@s.whatsapp.net",
                "text": SEND["text"],
                "media": None,
                "send_at": None,
            }
        ),
    )
    existing.outbound_id = str(queued.message.pk)
    return existing


def call(case: Any, headers: dict[str, str]) -> Any:
    """Call and validate; the database is left as it was (a DELETE hides nothing after it)."""
    with transaction.atomic():
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        transaction.set_rollback(True)
    assert response.status_code < 500 or response.status_code == BAD_GATEWAY, response.text
    return response


def cases(operation: Any, mode: GenerationMode, existing: Existing) -> Any:
    """Generated requests, half of them about an object that exists when there is a path
    parameter: random names and ids find nothing and would only ever reach the 404."""
    generated = operation.as_strategy(generation_mode=mode)
    params = sorted(parameter.name for parameter in operation.path_parameters)
    if not params:
        return generated
    return st.one_of(
        generated,
        st.sampled_from(existing.paths(params)).flatmap(
            lambda path: operation.as_strategy(generation_mode=mode, path_parameters=path)
        ),
    )


def test_every_operation_of_the_api_is_tested() -> None:
    # The provisioning actions and the message log are in the schema too.
    assert set(OPERATIONS) == {
        "GET /api/v1/instances/",
        "POST /api/v1/instances/",
        "GET /api/v1/instances/{name}/",
        "PUT /api/v1/instances/{name}/",
        "PATCH /api/v1/instances/{name}/",
        "DELETE /api/v1/instances/{name}/",
        "POST /api/v1/instances/{name}/set-default/",
        "GET /api/v1/instances/{name}/status/",
        "POST /api/v1/instances/{name}/provision/",
        "GET /api/v1/instances/{name}/qr/",
        "POST /api/v1/instances/{name}/test/",
        "GET /api/v1/messages/",
        "GET /api/v1/messages/{id}/",
        "POST /api/v1/messages/{id}/retry/",
        "GET /api/v1/conversations/",
        "GET /api/v1/conversations/{id}/",
        "POST /api/v1/conversations/{id}/pause/",
        "POST /api/v1/conversations/{id}/resume/",
        "POST /api/v1/conversations/{id}/reset/",
        "POST /api/v1/instances/{instance_name}/messages/",
        "GET /api/v1/instances/{instance_name}/messages/",
        "GET /api/v1/instances/{instance_name}/messages/{id}/",
        *(
            f"{method} /api/v1/instances/{{instance_name}}/{what}/{detail}"
            for what, key in (("agents", "{name}"), ("routes", "{id}"))
            for method, detail in (
                ("GET", ""),
                ("POST", ""),
                ("GET", f"{key}/"),
                ("PUT", f"{key}/"),
                ("PATCH", f"{key}/"),
                ("DELETE", f"{key}/"),
            )
        ),
        "GET /api/v1/instances/{instance_name}/send-keys/",
        "POST /api/v1/instances/{instance_name}/send-keys/",
        "DELETE /api/v1/instances/{instance_name}/send-keys/{id}/",
    }


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("label", list(OPERATIONS))
def test_generated_requests_get_documented_answers(
    label: str, mode: GenerationMode, existing: Existing
) -> None:
    operation = OPERATIONS[label]
    seen: set[int] = set()

    @HYPOTHESIS
    @given(case=cases(operation, mode, existing), auth=st.sampled_from(list(AUTH)))
    def run(case: Any, auth: str) -> None:
        response = call(case, AUTH[auth])
        seen.add(response.status_code)
        if auth != "api key":
            # Unless no route matched (a path parameter the lookup regex refuses).
            assert response.status_code == 401 or response.json() == NO_ROUTE, response.text

    run()
    # The run got past authentication, to the operation's own answers.
    assert seen - {401}, seen


# (operation, path parameters, query, body, expected status). With the 401 and
# 404 answers of test_every_documented_answer_is_reached, every status code in
# the schema.
NEW_TENANT = {
    "name": "globex",
    "evolution_url": "https://evolution.globex.example",
    "evolution_key": "globex-evolution-key",
    "agent_api_url": "http://[2001:db8::1]:8080/",
    "agent_api_key": "globex-agent-key",
}
TENANT_UPDATE = {**NEW_TENANT, "name": "acme", "webhook_token": ""}
AGENTS = "/api/v1/instances/{instance_name}/agents/"
AGENT = "/api/v1/instances/{instance_name}/agents/{name}/"
ROUTES = "/api/v1/instances/{instance_name}/routes/"
ROUTE = "/api/v1/instances/{instance_name}/routes/{id}/"
SEND_KEYS = "/api/v1/instances/{instance_name}/send-keys/"
SEND_KEY = "/api/v1/instances/{instance_name}/send-keys/{id}/"
IN_ACME = {"instance_name": "acme"}
SALES = {**IN_ACME, "name": "sales"}
A_ROUTE = {**IN_ACME, "id": "route"}
NEW_AGENT = {
    "name": "support",
    "agent_kind": "openai",
    "agent_api_url": "http://llm.acme.example/v1",
    "default_agent": "gpt-4o-mini",
}
NEW_ROUTE = {"match": "prefix", "value": "/help", "agent": "sales"}
SENDS = "/api/v1/instances/{instance_name}/messages/"
SEND = {"to": "5511987654321", "text": "Olá", "idempotency_key": "known-key"}
AN_OUTBOUND = {**IN_ACME, "id": "outbound"}
KNOWN_REQUESTS: list[tuple[str, dict[str, str], dict[str, str], Any, int]] = [
    ("GET /api/v1/instances/", {}, {}, None, 200),
    ("GET /api/v1/instances/", {}, {"page": "2"}, None, 404),
    ("POST /api/v1/instances/", {}, {}, NEW_TENANT, 201),
    ("POST /api/v1/instances/", {}, {}, {**NEW_TENANT, "evolution_url": "javascript:x"}, 400),
    ("GET /api/v1/instances/{name}/", {"name": "legacy"}, {}, None, 200),
    ("PUT /api/v1/instances/{name}/", {"name": "acme"}, {}, TENANT_UPDATE, 200),
    ("PUT /api/v1/instances/{name}/", {"name": "acme"}, {}, NEW_TENANT, 400),
    ("PATCH /api/v1/instances/{name}/", {"name": "acme"}, {}, {"agent_timeout": 5}, 200),
    ("PATCH /api/v1/instances/{name}/", {"name": "acme"}, {}, {"agent_timeout": 0}, 400),
    ("DELETE /api/v1/instances/{name}/", {"name": "acme"}, {}, None, 204),
    ("POST /api/v1/instances/{name}/set-default/", {"name": "acme"}, {}, None, 200),
    ("GET /api/v1/instances/{name}/status/", {"name": "acme"}, {}, None, 200),
    ("GET /api/v1/instances/{name}/status/", {"name": "legacy"}, {}, None, 409),
    ("GET /api/v1/instances/{name}/status/", {"name": "down"}, {}, None, 502),
    ("POST /api/v1/instances/{name}/provision/", {"name": "acme"}, {}, None, 200),
    ("POST /api/v1/instances/{name}/provision/", {"name": "legacy"}, {}, None, 409),
    ("POST /api/v1/instances/{name}/provision/", {"name": "down"}, {}, None, 502),
    ("GET /api/v1/instances/{name}/qr/", {"name": "acme"}, {}, None, 200),
    ("GET /api/v1/instances/{name}/qr/", {"name": "legacy"}, {}, None, 409),
    ("GET /api/v1/instances/{name}/qr/", {"name": "down"}, {}, None, 502),
    ("POST /api/v1/instances/{name}/test/", {"name": "acme"}, {}, None, 200),
    ("POST /api/v1/instances/{name}/test/", {"name": "down"}, {}, None, 200),
    ("GET /api/v1/messages/", {}, {"status": "failed", "search": "55"}, None, 200),
    ("GET /api/v1/messages/", {}, {"page_size": "1", "page": "2"}, None, 200),
    ("GET /api/v1/messages/", {}, {"received_after": "yesterday"}, None, 400),
    ("GET /api/v1/messages/", {}, {"page": "99"}, None, 404),
    ("GET /api/v1/messages/{id}/", {"id": Status.REPLIED}, {}, None, 200),
    ("POST /api/v1/messages/{id}/retry/", {"id": Status.FAILED}, {}, None, 200),
    ("POST /api/v1/messages/{id}/retry/", {"id": Status.QUEUED}, {}, None, 409),
    ("GET /api/v1/conversations/", {}, {"state": "paused", "instance": "acme"}, None, 200),
    ("GET /api/v1/conversations/", {}, {"state": "asleep"}, None, 400),
    ("GET /api/v1/conversations/", {}, {"page": "99"}, None, 404),
    ("GET /api/v1/conversations/{id}/", {"id": "conversation"}, {}, None, 200),
    ("POST /api/v1/conversations/{id}/pause/", {"id": "conversation"}, {}, {"minutes": 5}, 200),
    ("POST /api/v1/conversations/{id}/pause/", {"id": "conversation"}, {}, {"minutes": 0}, 400),
    ("POST /api/v1/conversations/{id}/resume/", {"id": "conversation"}, {}, None, 200),
    ("POST /api/v1/conversations/{id}/reset/", {"id": "conversation"}, {}, None, 200),
    (f"GET {AGENTS}", IN_ACME, {}, None, 200),
    (f"GET {AGENTS}", IN_ACME, {"page": "2"}, None, 404),
    (f"POST {AGENTS}", IN_ACME, {}, NEW_AGENT, 201),
    (f"POST {AGENTS}", IN_ACME, {}, {**NEW_AGENT, "agent_api_url": "javascript:x"}, 400),
    (f"GET {AGENT}", SALES, {}, None, 200),
    (f"PUT {AGENT}", SALES, {}, {**NEW_AGENT, "name": "sales", "agent_api_key": "k"}, 200),
    (f"PUT {AGENT}", SALES, {}, NEW_AGENT, 400),
    (f"PATCH {AGENT}", SALES, {}, {"agent_timeout": 5}, 200),
    (f"PATCH {AGENT}", SALES, {}, {"agent_timeout": 0}, 400),
    (f"DELETE {AGENT}", {**IN_ACME, "name": "idle"}, {}, None, 204),
    (f"DELETE {AGENT}", SALES, {}, None, 400),
    (f"GET {ROUTES}", IN_ACME, {}, None, 200),
    (f"GET {ROUTES}", IN_ACME, {"page": "2"}, None, 404),
    (f"POST {ROUTES}", IN_ACME, {}, NEW_ROUTE, 201),
    (f"POST {ROUTES}", IN_ACME, {}, {**NEW_ROUTE, "match": "regex", "value": "("}, 400),
    (f"GET {ROUTE}", A_ROUTE, {}, None, 200),
    (f"PUT {ROUTE}", A_ROUTE, {}, NEW_ROUTE, 200),
    (f"PUT {ROUTE}", A_ROUTE, {}, {**NEW_ROUTE, "agent": "nobody"}, 400),
    (f"PATCH {ROUTE}", A_ROUTE, {}, {"position": 3}, 200),
    (f"PATCH {ROUTE}", A_ROUTE, {}, {"match": "chat"}, 400),
    (f"DELETE {ROUTE}", A_ROUTE, {}, None, 204),
    (f"GET {SEND_KEYS}", IN_ACME, {}, None, 200),
    (f"POST {SEND_KEYS}", IN_ACME, {}, {"name": "erp"}, 201),
    (f"POST {SEND_KEYS}", IN_ACME, {}, {"name": "x" * 101}, 400),
    (f"DELETE {SEND_KEY}", {**IN_ACME, "id": "send_key"}, {}, None, 204),
    (f"POST {SENDS}", IN_ACME, {}, {"to": "5511987654321", "text": "new"}, 202),
    (f"POST {SENDS}", IN_ACME, {}, SEND, 200),
    (f"POST {SENDS}", IN_ACME, {}, {**SEND, "text": "another"}, 409),
    (f"POST {SENDS}", {"instance_name": "legacy"}, {}, {"to": "5511987654321", "text": "a"}, 409),
    (f"POST {SENDS}", IN_ACME, {}, {"to": "x", "text": "a"}, 400),
    (f"GET {SENDS}", IN_ACME, {"status": "queued", "to": "5511987654321"}, None, 200),
    (f"GET {SENDS}", IN_ACME, {"status": "lost"}, None, 400),
    (f"GET {SENDS}", IN_ACME, {"page": "99"}, None, 404),
    (f"GET {SENDS}{{id}}/", AN_OUTBOUND, {}, None, 200),
]


def known_case(existing: Existing, label: str, path: dict[str, str], query: dict, body: Any):
    if path.get("id") == "conversation":
        path = {"id": existing.conversation_id}
    elif path.get("id") == "route":
        path = {**path, "id": existing.route_id}
    elif path.get("id") == "send_key":
        path = {**path, "id": existing.send_key_id}
    elif path.get("id") == "outbound":
        path = {**path, "id": existing.outbound_id}
    elif "id" in path:
        path = {"id": existing.message_ids[Status(path["id"])]}
    operation = OPERATIONS[label]
    if body is None:
        return operation.Case(path_parameters=path, query=query)
    return operation.Case(
        path_parameters=path, query=query, body=body, media_type="application/json"
    )


@pytest.mark.parametrize(
    ("label", "path", "query", "body", "status"),
    KNOWN_REQUESTS,
    ids=[f"{label} {path or query} {status}" for label, path, query, _, status in KNOWN_REQUESTS],
)
def test_known_requests_get_their_documented_answer(
    existing: Existing, label: str, path: dict[str, str], query: dict, body: Any, status: int
) -> None:
    response = call(known_case(existing, label, path, query, body), AUTH["api key"])

    assert response.status_code == status, response.text


def test_every_documented_answer_is_reached(existing: Existing, django_user_model) -> None:
    reached = {(label, str(status)) for label, *_, status in KNOWN_REQUESTS}
    # A staff user without any permission: every operation's 403.
    staff = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
    no_permission = {"Authorization": f"Token {Token.objects.create(user=staff).key}"}
    for label, operation in OPERATIONS.items():
        params = [parameter.name for parameter in operation.path_parameters]
        found = {
            "name": "acme",
            "id": existing.message_ids[Status.FAILED],
            "instance_name": "acme",
        }
        response = call(operation.Case(path_parameters={p: found[p] for p in params}), {})
        assert response.status_code == 401, response.text
        reached.add((label, "401"))
        case = operation.Case(path_parameters={p: found[p] for p in params})
        response = call(case, no_permission)
        assert response.status_code == 403, response.text
        reached.add((label, "403"))
        if params:
            missing = {"name": "nobody", "id": "987654321", "instance_name": "nobody"}
            case = operation.Case(path_parameters={p: missing[p] for p in params})
            response = call(case, AUTH["api key"])
            assert response.status_code == 404, response.text
            reached.add((label, "404"))

    documented = {
        (label, status)
        for label, operation in OPERATIONS.items()
        for status in operation.definition.raw["responses"]
    }
    assert documented == reached


# --- Django's own error pages: JSON under /api/ and /webhook/ ---------------------

UNROUTABLE = [
    "/api/v1/instances/a%20b/",
    "/api/v1/instances/..%2F..%2Fetc/",
    "/api/v1/instances/%00/",
    "/api/v1/instances/%C2%84/set-default/",
    f"/api/v1/instances/{'a' * 65}/",
    "/api/v1/messages/-1/",
    "/api/v1/messages/1.5/retry/",
    "/api/v1/nothing-here/",
    "/webhook/evolution/a/b/c/d",
    "/webhook/other",
]


@pytest.mark.django_db
@pytest.mark.parametrize("path", UNROUTABLE)
def test_a_path_no_route_matches_answers_json_404(client: Client, path: str) -> None:
    response = client.get(path, headers={"x-api-key": API_KEY})

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == NO_ROUTE


@pytest.mark.django_db
@pytest.mark.parametrize("message_id", ["99999999999999999999999", "0"])
def test_a_message_id_beyond_any_row_answers_json_404(client: Client, message_id: str) -> None:
    response = client.get(f"/api/v1/messages/{message_id}/", headers={"x-api-key": API_KEY})

    assert response.status_code == 404
    assert response.json() == {"detail": "No InboundMessage matches the given query."}


@pytest.mark.django_db
def test_pages_outside_the_api_keep_djangos_html_404(client: Client) -> None:
    response = client.get("/nothing-here/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_an_uncaught_exception_under_the_api_answers_json_500() -> None:
    factory = RequestFactory()

    api = errors.server_error(factory.get("/api/v1/instances/"))
    webhook = errors.server_error(factory.post("/webhook/evolution/acme"))
    page = errors.server_error(factory.get("/admin/"))

    assert (api.status_code, api["Content-Type"]) == (500, "application/json")
    assert api.content == b'{"detail": "Internal server error."}'
    assert (webhook.status_code, webhook["Content-Type"]) == (500, "application/json")
    assert page.status_code == 500
    assert page["Content-Type"].startswith("text/html")


@pytest.mark.django_db
def test_a_request_django_refuses_under_the_api_answers_json_400(client: Client) -> None:
    # More query parameters than DATA_UPLOAD_MAX_NUMBER_FIELDS: Django's own 400.
    query = "&".join(f"p{i}=1" for i in range(1001))
    response = client.get(f"/api/v1/messages/?{query}", headers={"x-api-key": API_KEY})

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Bad request."}


def test_the_error_pages_are_installed() -> None:
    from omnihub import urls

    assert urls.handler400 == "omnihub.errors.bad_request"
    assert urls.handler404 == "omnihub.errors.not_found"
    assert urls.handler500 == "omnihub.errors.server_error"
