from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.test import Client, override_settings
from rest_framework.authtoken.models import Token

from instances.models import InstanceConfig

LIST = "/api/v1/instances/"
ACME = "/api/v1/instances/acme/"
SET_DEFAULT = "/api/v1/instances/acme/set-default/"
SECRETS = {
    "evolution_key": "evo-key-SECRET-1",
    "agent_api_key": "agent-key-SECRET-2",
    "webhook_token": "webhook-token-SECRET-3",
}
NEW = {
    "name": "globex",
    "evolution_url": "https://evolution.globex.test",
    "agent_api_url": "https://agent.globex.test",
    **SECRETS,
}
# Every operation, with a body valid for it when "acme" exists.
OPERATIONS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("get", LIST, None),
    ("post", LIST, NEW),
    ("get", ACME, None),
    ("put", ACME, {"name": "acme", "agent_api_url": "http://agent.acme.test/v2"}),
    ("patch", ACME, {"default_agent": "other_agent"}),
    ("delete", ACME, None),
    ("post", SET_DEFAULT, None),
]
EXPECTED_STATUS = {"get": 200, "post": 200, "put": 200, "patch": 200, "delete": 204}


def call(client: Client, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    if body is None:
        return getattr(client, method)(path)
    return getattr(client, method)(path, body, content_type="application/json")


@pytest.fixture
def staff(django_user_model):
    """A staff user holding every permission on instances (see test_api_permissions.py)."""
    user = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="instances"))
    return user


@pytest.fixture
def api(client: Client, db: None) -> Client:
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY
    return client


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance(**SECRETS)


@pytest.fixture(params=["api key", "staff token", "staff session"])
def authed(request, client: Client, staff) -> Client:
    if request.param == "api key":
        client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY
    elif request.param == "staff token":
        client.defaults["HTTP_AUTHORIZATION"] = f"Token {Token.objects.create(user=staff).key}"
    else:
        client.force_login(staff)
    return client


@pytest.mark.parametrize(("method", "path", "body"), OPERATIONS)
def test_every_operation_works_with_each_way_to_authenticate(authed, acme, method, path, body):
    response = call(authed, method, path, body)
    expected = 201 if path == LIST and method == "post" else EXPECTED_STATUS[method]
    assert response.status_code == expected, response.content


@pytest.fixture(params=["nothing", "wrong key", "blank key", "non-staff token", "non-staff login"])
def unauthorized(request, client: Client, django_user_model) -> Client:
    user = django_user_model.objects.create_user("someone", password="pw")
    if request.param == "wrong key":
        client.defaults["HTTP_X_API_KEY"] = "not-the-key"
    elif request.param == "blank key":
        client.defaults["HTTP_X_API_KEY"] = ""
    elif request.param == "non-staff token":
        client.defaults["HTTP_AUTHORIZATION"] = f"Token {Token.objects.create(user=user).key}"
    elif request.param == "non-staff login":
        client.force_login(user)
    return client


@pytest.mark.parametrize(("method", "path", "body"), OPERATIONS)
def test_every_operation_answers_401_json_without_valid_credentials(
    unauthorized, acme, method, path, body
):
    response = call(unauthorized, method, path, body)
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json()["detail"]
    assert list(InstanceConfig.objects.values_list("name", "default_agent", "is_default")) == [
        ("acme", "acme_agent", False)
    ]


@override_settings(OMNIHUB_API_KEY="")
@pytest.mark.parametrize("key", ["", "test-api-key"])
def test_the_api_key_method_is_off_when_no_key_is_configured(client, acme, key):
    response = client.get(LIST, HTTP_X_API_KEY=key)
    assert response.status_code == 401
    assert "detail" in response.json()


def test_the_list_is_paginated(api, make_instance):
    for name in ("b", "a"):
        make_instance(name=name)
    body = api.get(LIST).json()
    assert body["count"] == 2
    assert [item["name"] for item in body["results"]] == ["a", "b"]
    assert api.get(LIST + "?page=2").status_code == 404


def test_a_response_shows_the_settings_and_whether_secrets_are_set(api, acme):
    body = api.get(ACME).json()
    assert body["webhook_url"] == "http://127.0.0.1:8000/webhook/evolution/acme"
    assert body["has_evolution_key"] is body["has_agent_api_key"] is body["has_webhook_token"]
    assert body["has_webhook_token"] is True
    assert body["evolution_url"] == "http://evolution.acme.test"
    assert body["agent_timeout"] == 60
    assert {"created_at", "updated_at", "fallback_message", "session_id_prefix"} <= set(body)
    assert not set(SECRETS) & set(body)


def test_secrets_are_absent_from_every_response(api, acme, make_instance):
    make_instance(name="old", is_default=True)
    delete_last = sorted(OPERATIONS, key=lambda operation: operation[0] == "delete")
    responses = [call(api, method, path, body) for method, path, body in delete_last]
    responses.append(call(api, "post", LIST, {**NEW, "name": "bad name"}))
    responses.append(call(api, "patch", "/api/v1/instances/globex/", {"agent_timeout": 0}))
    assert [r.status_code for r in responses] == [200, 201, 200, 200, 200, 200, 204, 400, 400]
    for response in responses:
        for secret in SECRETS.values():
            assert secret not in response.content.decode()


def test_it_creates_an_instance(api):
    response = call(api, "post", LIST, NEW)
    assert response.status_code == 201
    assert response.json()["name"] == "globex"
    stored = InstanceConfig.objects.get(name="globex")
    assert (stored.evolution_key, stored.agent_api_key, stored.webhook_token) == tuple(
        SECRETS.values()
    )
    assert stored.default_agent == "simple_agent"


def test_it_generates_a_webhook_token_when_none_is_given(api):
    body = {key: value for key, value in NEW.items() if key != "webhook_token"}
    assert call(api, "post", LIST, body).json()["has_webhook_token"] is True
    assert len(InstanceConfig.objects.get(name="globex").webhook_token) >= 32


def test_a_blank_webhook_token_accepts_unauthenticated_deliveries(api):
    response = call(api, "post", LIST, {**NEW, "webhook_token": ""})
    assert response.json()["has_webhook_token"] is False
    assert InstanceConfig.objects.get(name="globex").webhook_token == ""


INVALID_CREATES = [
    ({"name": "bad name!"}, "name", "letters, digits"),
    ({"name": "messages-upsert"}, "name", "Evolution event name"),
    ({"name": "acme"}, "name", "already exists"),
    ({"evolution_url": "ftp://evolution.globex.test"}, "evolution_url", "http:// or https://"),
    ({"agent_api_url": "ftp://agent.globex.test"}, "agent_api_url", "http:// or https://"),
    ({"evolution_url": ""}, "evolution_url", "Required unless legacy mode is on"),
    ({"evolution_key": ""}, "evolution_key", "Required unless legacy mode is on"),
    ({"agent_timeout": 0}, "agent_timeout", "greater than or equal to 1"),
    ({"agent_timeout": 601}, "agent_timeout", "less than or equal to 600"),
    ({"agent_api_key": "has space"}, "agent_api_key", "printable ASCII"),
]


@pytest.mark.parametrize(("change", "field", "message"), INVALID_CREATES)
def test_it_refuses_an_invalid_instance_with_the_models_message(api, acme, change, field, message):
    response = call(api, "post", LIST, {**NEW, **change})
    assert response.status_code == 400
    errors = response.json()[field]
    assert message in errors[0]
    # The same text as the admin and the CLI, which show the model's errors.
    with pytest.raises(ValidationError) as model:
        InstanceConfig(**{**NEW, **change}).full_clean()
    assert errors == model.value.message_dict[field]
    assert list(InstanceConfig.objects.values_list("name", flat=True)) == ["acme"]


def test_it_reports_all_errors_of_a_request_together(api):
    body = {"name": "call", "agent_api_url": "ftp://agent.test", "agent_api_key": "k"}
    response = call(api, "post", LIST, body)
    assert response.status_code == 400
    assert {"name", "agent_api_url", "evolution_url", "evolution_key"} <= set(response.json())


def test_it_requires_the_agent_api_key_on_create(api):
    body = {key: value for key, value in NEW.items() if key != "agent_api_key"}
    response = call(api, "post", LIST, body)
    assert response.status_code == 400
    assert "agent_api_key" in response.json()


@pytest.mark.parametrize("method", ["put", "patch"])
def test_it_refuses_a_rename(api, acme, method):
    response = call(api, method, ACME, {"name": "renamed", "agent_api_url": "https://a.test"})
    assert response.status_code == 400
    assert "cannot be renamed" in response.json()["name"][0]
    assert list(InstanceConfig.objects.values_list("name", flat=True)) == ["acme"]


def test_an_instance_in_legacy_mode_may_leave_evolution_blank(api):
    body = {"name": "legacy", "legacy_mode": True, "agent_api_url": "https://a.test"}
    response = call(api, "post", LIST, {**body, "agent_api_key": "k"})
    assert response.status_code == 201
    assert response.json()["legacy_mode"] is True
    assert response.json()["legacy_server_url"] == ""


def test_a_default_instance_without_legacy_mode_needs_evolution(api):
    body = {"name": "legacy", "is_default": True, "agent_api_url": "https://a.test"}
    response = call(api, "post", LIST, {**body, "agent_api_key": "k"})
    assert response.status_code == 400
    assert "legacy mode" in response.json()["evolution_url"][0]


def test_creating_a_default_instance_takes_the_flag_from_the_old_one(api, make_instance):
    make_instance(name="old", is_default=True)
    assert call(api, "post", LIST, {**NEW, "is_default": True}).status_code == 201
    assert list(InstanceConfig.objects.filter(is_default=True).values_list("name", flat=True)) == [
        "globex"
    ]


def test_set_default_moves_the_flag(api, acme, make_instance):
    make_instance(name="old", is_default=True)
    response = call(api, "post", SET_DEFAULT)
    assert response.status_code == 200
    assert response.json()["is_default"] is True
    assert list(InstanceConfig.objects.filter(is_default=True).values_list("name", flat=True)) == [
        "acme"
    ]


def test_patch_changes_only_the_fields_it_sends(api, acme):
    response = call(api, "patch", ACME, {"default_agent": "other_agent", "agent_timeout": 30})
    assert response.status_code == 200
    stored = InstanceConfig.objects.get(name="acme")
    assert (stored.default_agent, stored.agent_timeout) == ("other_agent", 30)
    assert (stored.evolution_key, stored.agent_api_key, stored.webhook_token) == tuple(
        SECRETS.values()
    )


def test_put_keeps_the_secrets_it_does_not_send(api, acme):
    # The same host: a new one needs its key again (test_key_follows_url.py).
    body = {"name": "acme", "agent_api_url": "http://agent.acme.test/v2"}
    assert call(api, "put", ACME, body).status_code == 200
    stored = InstanceConfig.objects.get(name="acme")
    assert stored.agent_api_url == "http://agent.acme.test/v2"
    assert (stored.evolution_key, stored.agent_api_key, stored.webhook_token) == tuple(
        SECRETS.values()
    )


def test_patch_replaces_a_secret_it_sends(api, acme):
    assert call(api, "patch", ACME, {"webhook_token": ""}).json()["has_webhook_token"] is False
    assert call(api, "patch", ACME, {"agent_api_key": "new-key"}).status_code == 200
    stored = InstanceConfig.objects.get(name="acme")
    assert (stored.webhook_token, stored.agent_api_key) == ("", "new-key")


def test_patch_validates_the_resulting_instance(api, acme):
    response = call(api, "patch", ACME, {"evolution_url": ""})
    assert response.status_code == 400
    assert "Required unless" in response.json()["evolution_url"][0]
    assert InstanceConfig.objects.get(name="acme").evolution_url == "http://evolution.acme.test"


def test_delete_removes_the_instance(api, acme):
    assert api.delete(ACME).status_code == 204
    assert not InstanceConfig.objects.exists()


@pytest.mark.parametrize(("method", "path", "body"), OPERATIONS[2:])
def test_an_unknown_name_answers_404_json(api, method, path, body, db):
    response = call(api, method, path, body)
    assert response.status_code == 404
    assert response.json()["detail"]
