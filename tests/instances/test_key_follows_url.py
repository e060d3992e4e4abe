"""A URL moved to another host (scheme, host or port) must come with its key in the
same change: otherwise whoever may edit a URL could have the hub send the stored
key to a server of their choosing. One rule in the model; admin, API and CLI."""

from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from instances.models import InstanceConfig
from tests.conftest import CONVERSATION_FORM_DEFAULTS

# instance_fields() in tests/conftest.py: what "acme" holds.
STORED = {"evolution_url": "http://evolution.acme.test", "agent_api_url": "http://agent.acme.test"}
KEY = {"evolution_url": "evolution_key", "agent_api_url": "agent_api_key"}
LABEL = {"evolution_url": "Evolution API key", "agent_api_url": "Agent API key"}
ELSEWHERE = [
    ("another host", "http://attacker.example"),
    ("another scheme", "https://{host}"),
    ("another port", "http://{host}:8080"),
]
URL_FIELDS = list(STORED)


def moved(url_field: str, template: str) -> str:
    return template.format(host=STORED[url_field].removeprefix("http://"))


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


def stored_values(acme: InstanceConfig) -> tuple[str, ...]:
    acme.refresh_from_db()
    return (acme.evolution_url, acme.evolution_key, acme.agent_api_url, acme.agent_api_key)


@pytest.mark.parametrize("url_field", URL_FIELDS)
@pytest.mark.parametrize(("what", "template"), ELSEWHERE, ids=[case[0] for case in ELSEWHERE])
def test_the_model_refuses_a_url_on_another_host_without_its_key(acme, url_field, what, template):
    instance = InstanceConfig.objects.get(pk=acme.pk)
    setattr(instance, url_field, moved(url_field, template))

    with pytest.raises(ValidationError) as error:
        instance.full_clean()

    (message,) = error.value.message_dict[KEY[url_field]]
    assert f"give the {LABEL[url_field]} again" in message
    assert "another host" in message


@pytest.mark.parametrize("url_field", URL_FIELDS)
def test_a_url_on_another_host_is_accepted_with_its_key_even_unchanged(acme, url_field):
    instance = InstanceConfig.objects.get(pk=acme.pk)
    setattr(instance, url_field, "https://new.example")
    # Given again, though the same value: the operator chose to send it there.
    setattr(instance, KEY[url_field], getattr(acme, KEY[url_field]))

    instance.full_clean()


@pytest.mark.parametrize("url_field", URL_FIELDS)
def test_a_new_path_on_the_same_host_keeps_the_key(acme, url_field):
    instance = InstanceConfig.objects.get(pk=acme.pk)
    setattr(instance, url_field, STORED[url_field].upper() + ":80/v2/")

    instance.full_clean()


@pytest.mark.parametrize("url_field", URL_FIELDS)
def test_the_api_refuses_a_url_on_another_host_without_its_key(
    client, api_key_headers, acme, url_field
):
    before = stored_values(acme)

    response = client.patch(
        f"/api/v1/instances/{acme.name}/",
        {url_field: "https://attacker.example"},
        content_type="application/json",
        **api_key_headers,
    )

    assert response.status_code == 400
    assert f"give the {LABEL[url_field]} again" in response.json()[KEY[url_field]][0]
    assert stored_values(acme) == before


def test_the_api_moves_a_url_given_with_its_key(client, api_key_headers, acme):
    body = {"agent_api_url": "https://agent.new.example", "agent_api_key": "agent-key-2"}

    response = client.patch(
        f"/api/v1/instances/{acme.name}/", body, content_type="application/json", **api_key_headers
    )

    assert response.status_code == 200
    acme.refresh_from_db()
    assert (acme.agent_api_url, acme.agent_api_key) == tuple(body.values())


@pytest.mark.parametrize("url_field", URL_FIELDS)
def test_the_cli_refuses_a_url_on_another_host_without_its_key(acme, url_field):
    before = stored_values(acme)
    err = StringIO()

    with pytest.raises(CommandError):
        option = f"--{url_field.replace('_', '-')}"
        call_command("instances", "update", "acme", option, "https://attacker.example", stderr=err)

    assert f"error: {KEY[url_field]}: The " in err.getvalue()
    assert f"give the {LABEL[url_field]} again" in err.getvalue()
    assert stored_values(acme) == before


def test_the_cli_moves_a_url_given_with_its_key(acme):
    call_command(
        "instances",
        "update",
        "acme",
        "--evolution-url",
        "https://evolution.new.example",
        "--evolution-key",
        "acme-evolution-key",
        stdout=StringIO(),
    )

    acme.refresh_from_db()
    assert acme.evolution_url == "https://evolution.new.example"


def admin_form(acme: InstanceConfig, **changes: str) -> dict[str, str]:
    """What the change page posts: the secret inputs empty unless typed in."""
    return {
        "is_active": "on",
        "evolution_url": acme.evolution_url,
        "evolution_key": "",
        "whatsapp_instance": acme.whatsapp_instance,
        "agent_api_url": acme.agent_api_url,
        "agent_api_key": "",
        "default_agent": acme.default_agent,
        "agent_timeout": "60",
        "fallback_message": "Try again later.",
        "webhook_token": "",
        **CONVERSATION_FORM_DEFAULTS,
        "_save": "Save",
        **changes,
    }


@pytest.mark.parametrize("url_field", URL_FIELDS)
def test_the_admin_refuses_a_url_on_another_host_without_its_key(admin_client, acme, url_field):
    before = stored_values(acme)
    url = f"/admin/instances/instanceconfig/{acme.pk}/change/"

    response = admin_client.post(url, admin_form(acme, **{url_field: "https://attacker.example"}))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert f"give the {LABEL[url_field]} again" in errors[KEY[url_field]][0]
    assert stored_values(acme) == before


def test_the_admin_keeps_an_empty_key_when_the_host_stays(admin_client, acme):
    url = f"/admin/instances/instanceconfig/{acme.pk}/change/"

    response = admin_client.post(
        url, admin_form(acme, agent_api_url=STORED["agent_api_url"] + "/v2")
    )

    assert response.status_code == 302
    acme.refresh_from_db()
    assert (acme.agent_api_url, acme.agent_api_key) == (
        "http://agent.acme.test/v2",
        "acme-agent-key",
    )


def test_the_admin_moves_a_url_given_with_its_key(admin_client, acme):
    url = f"/admin/instances/instanceconfig/{acme.pk}/change/"
    data = admin_form(acme, evolution_url="https://evo.new.example", evolution_key="evo-key-2")

    assert admin_client.post(url, data).status_code == 302
    acme.refresh_from_db()
    assert (acme.evolution_url, acme.evolution_key) == ("https://evo.new.example", "evo-key-2")
