"""agent_kind, system_prompt and history_limit: the model's rules, and the same
names in the REST API, the admin and the CLI."""

from io import StringIO

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client

from instances.models import AGENT_KEY_REQUIRED, MAX_HISTORY_LIMIT, InstanceConfig
from tests.conftest import instance_fields

LIST = "/api/v1/instances/"


def errors_of(**fields) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as caught:
        InstanceConfig(**instance_fields(**fields)).full_clean()
    return caught.value.message_dict


def test_an_existing_instance_keeps_todays_contract(make_instance) -> None:
    instance = make_instance()

    assert (instance.agent_kind, instance.system_prompt, instance.history_limit) == (
        "automagik",
        "",
        20,
    )


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["openai", "webhook"])
def test_openai_and_webhook_agents_may_have_no_key(kind: str) -> None:
    InstanceConfig(**instance_fields(agent_kind=kind, agent_api_key="")).full_clean()


@pytest.mark.django_db
def test_an_automagik_agent_needs_its_key() -> None:
    assert errors_of(agent_api_key="")["agent_api_key"] == [AGENT_KEY_REQUIRED]


@pytest.mark.django_db
def test_an_unknown_kind_and_a_history_limit_out_of_range_are_refused() -> None:
    errors = errors_of(agent_kind="langflow", history_limit=MAX_HISTORY_LIMIT + 1)

    assert "agent_kind" in errors
    assert "history_limit" in errors


def test_the_api_creates_and_shows_an_openai_instance(client: Client, db) -> None:
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY
    body = {
        **instance_fields(name="llm", agent_api_key=""),
        "agent_kind": "openai",
        "system_prompt": "Be brief.",
        "history_limit": 6,
    }
    del body["agent_api_key"]

    created = client.post(LIST, body, content_type="application/json")

    assert created.status_code == 201, created.content
    data = created.json()
    assert (data["agent_kind"], data["system_prompt"], data["history_limit"]) == (
        "openai",
        "Be brief.",
        6,
    )
    assert data["has_agent_api_key"] is False


def test_the_api_refuses_an_automagik_instance_without_a_key(client: Client, db) -> None:
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY
    body = instance_fields(name="nokey")
    del body["agent_api_key"]

    response = client.post(LIST, body, content_type="application/json")

    assert response.status_code == 400
    assert response.json()["agent_api_key"] == [AGENT_KEY_REQUIRED]


def test_the_admin_shows_the_agent_group_with_the_new_fields(admin_client, make_instance) -> None:
    instance = make_instance()

    response = admin_client.get(f"/admin/instances/instanceconfig/{instance.pk}/change/")

    for name in (b"agent_kind", b"system_prompt", b"history_limit"):
        assert b'name="' + name + b'"' in response.content


def run(*args: str) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("instances", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def test_the_cli_sets_the_agent_fields_with_set(make_instance) -> None:
    make_instance()

    code, _, err = run(
        "update",
        "acme",
        "--set",
        "agent_kind=openai",
        "--set",
        "system_prompt=Be brief.",
        "--set",
        "history_limit=8",
    )

    assert code == 0, err
    stored = InstanceConfig.objects.get(name="acme")
    assert (stored.agent_kind, stored.system_prompt, stored.history_limit) == (
        "openai",
        "Be brief.",
        8,
    )
    _, shown, _ = run("show", "acme")
    assert "agent kind:" in shown and "openai" in shown
    assert "history limit:" in shown


def test_the_cli_refuses_an_unknown_kind_in_the_models_words(make_instance) -> None:
    make_instance()

    code, _, err = run("update", "acme", "--set", "agent_kind=langflow")

    assert code == 1
    assert "agent_kind" in err
    assert InstanceConfig.objects.get(name="acme").agent_kind == "automagik"
