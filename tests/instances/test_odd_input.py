"""Odd names, URLs and secrets through the admin, the REST API and the CLI.

Each is refused with an error on its field and nothing stored, or accepted
when it is valid, the same way everywhere; never a 500 or a traceback. The
admin's and the API's text fields strip surrounding whitespace, the CLI takes
arguments as given: only there does "acme\\n" reach the model's validators.
"""

import json
from collections.abc import Callable
from io import StringIO
from typing import Any, NamedTuple

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from instances.cli import snapshot
from instances.models import SECRET_FIELDS, InstanceConfig
from tests.conftest import CONVERSATION_FORM_DEFAULTS

ADD = "/admin/instances/instanceconfig/add/"
API = "/api/v1/instances/"
INTERFACES = ["admin", "api", "cli"]
VALID = {
    "name": "odd",
    "evolution_url": "https://evolution.example.com",
    "evolution_key": "evolution-key",
    "agent_api_url": "https://agent.example.com",
    "agent_api_key": "agent-key",
    "webhook_token": "webhook-token",
}
# Accepted by the admin and the API (which strip it), refused by the CLI.
STRIPPED = {"admin": True, "api": True, "cli": False}

# (field, what it is, value, accepted: everywhere, nowhere or per interface)
Case = tuple[str, str, str, bool | dict[str, bool]]
NAMES: list[Case] = [
    ("name", "unicode", "ação", False),
    ("name", "space", "a b", False),
    ("name", "slash", "a/b", False),
    ("name", "dot-dot-slash", "../etc", False),
    ("name", "percent-encoded slash", "a%2Fb", False),
    ("name", "65 characters", "a" * 65, False),
    ("name", "64 characters", "a" * 64, True),
    ("name", "empty", "", False),
    ("name", "NUL", "ac\x00me", False),
    ("name", "emoji", "acme😀", False),
    ("name", "event slug", "MESSAGES-UPSERT", False),
    ("name", "trailing newline", "acme\n", STRIPPED),
    ("name", "surrounding spaces", " acme ", STRIPPED),
]
URL_CASES = [
    ("IPv6 host", "http://[2001:db8::1]:8080/v1", True),
    ("IPv6 loopback", "http://[::1]", True),
    ("IDN host", "https://évolution.example/", True),
    ("500 characters", "https://evo.example.com/" + "a" * 476, True),
    ("501 characters", "https://evo.example.com/" + "a" * 477, False),
    ("space in the path", "https://evo.example.com/a b", False),
    ("space in the host", "https://evo example.com", False),
    ("newline in the path", "https://evo.example.com/a\nb", False),
    ("NUL", "https://evo.example.com/\x00", False),
    ("javascript", "javascript:alert(1)", False),
    ("http without a host", "http://", False),
    ("a path without a host", "http:///evolution", False),
    ("ftp", "ftp://evo.example.com", False),
    ("relative", "/evolution", False),
    ("unclosed IPv6 bracket", "http://[::1", False),
    ("port out of range", "https://evo.example.com:99999", False),
    # The URL is shown in the admin, the API, the CLI and error messages:
    # credentials in it would be a secret in all of them. Keys go in the key fields.
    ("credentials", "https://user:secret@evo.example.com", False),
    ("empty", "", False),
    ("trailing newline", "https://evo.example.com\n", STRIPPED),
]
SECRET_CASES = [
    ("newline inside", "abc\ndef", False),
    ("tab", "abc\tdef", False),
    ("space", "abc def", False),
    ("unicode", "chave-ação", False),
    ("emoji", "key-🔑", False),
    ("NUL", "abc\x00def", False),
    ("513 characters", "k" * 513, False),
    ("512 characters", "k" * 512, True),
    ("trailing newline", "abcdef\n", STRIPPED),
]
# Every case on one field of each kind; the fields sharing its validator get a few.
SIBLING_CASES = {
    "IPv6 host",
    "javascript",
    "credentials",
    "NUL",
    "newline inside",
    "512 characters",
}
URLS: list[Case] = [("evolution_url", *case) for case in URL_CASES] + [
    ("agent_api_url", *case) for case in URL_CASES if case[0] in SIBLING_CASES
]
SECRETS: list[Case] = [("evolution_key", *case) for case in SECRET_CASES] + [
    (field, *case)
    for field in ("agent_api_key", "webhook_token")
    for case in SECRET_CASES
    if case[0] in SIBLING_CASES
]
# The fields without a validator of their own still cannot hold what the
# database cannot store (PostgreSQL refuses NUL in text).
OTHERS: list[Case] = [
    (field, "NUL", "ab\x00c", False)
    for field in ("whatsapp_instance", "default_agent", "session_id_prefix", "fallback_message")
]
ODD_INPUT = NAMES + URLS + SECRETS + OTHERS


def case_id(case: Case) -> str:
    return f"{case[0]}-{case[1]}"


class Outcome(NamedTuple):
    ok: bool
    # Field name -> messages; for the CLI, parsed from its `error: <field>: ...` lines.
    errors: dict[str, list[str]]


def cli(*args: str) -> Outcome:
    out, err = StringIO(), StringIO()
    try:
        call_command("instances", *args, stdout=out, stderr=err)
    except CommandError as exc:
        assert exc.returncode == 1
        errors: dict[str, list[str]] = {}
        lines = err.getvalue().splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), lines
        for line in lines:
            field, _, message = line.removeprefix("error: ").partition(": ")
            errors.setdefault(field, []).append(message)
        return Outcome(False, errors)
    return Outcome(True, {})


def cli_options(fields: dict[str, str]) -> list[str]:
    return [arg for key, value in fields.items() for arg in (f"--{key.replace('_', '-')}", value)]


def admin_form(fields: dict[str, str]) -> dict[str, str]:
    return {
        "is_active": "on",
        "default_agent": "support",
        "agent_timeout": "60",
        "fallback_message": "Try again later.",
        **CONVERSATION_FORM_DEFAULTS,
        "_save": "Save",
        **fields,
    }


def api_outcome(response: Any) -> Outcome:
    assert response.status_code in (200, 201, 400), response.content[:500]
    if response.status_code == 400:
        return Outcome(False, response.json())
    return Outcome(True, {})


Create = Callable[[dict[str, str]], Outcome]


@pytest.fixture(params=INTERFACES)
def interface(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def create(interface: str, admin_client: Client, client: Client, api_key_headers) -> Create:
    def create(fields: dict[str, str]) -> Outcome:
        if interface == "admin":
            response = admin_client.post(ADD, admin_form(fields))
            if response.status_code == 302:
                return Outcome(True, {})
            assert response.status_code == 200, response.content[:500]
            form = response.context["adminform"].form
            return Outcome(
                False, {field: list(messages) for field, messages in form.errors.items()}
            )
        if interface == "api":
            body = json.dumps(fields)
            return api_outcome(
                client.post(API, body, content_type="application/json", **api_key_headers)
            )
        return cli("create", *cli_options(fields))

    return create


@pytest.mark.parametrize(
    ("field", "what", "value", "accepted"), ODD_INPUT, ids=map(case_id, ODD_INPUT)
)
def test_odd_input_is_refused_on_its_field_or_stored(
    create: Create, interface: str, field: str, what: str, value: str, accepted: Any
) -> None:
    if isinstance(accepted, dict):
        accepted = accepted[interface]
    fields = {**VALID, field: value}

    outcome = create(fields)

    if accepted:
        assert outcome.ok, outcome.errors
        stored = InstanceConfig.objects.get()
        assert getattr(stored, field) == value.strip()
    else:
        assert not outcome.ok
        assert field in outcome.errors, outcome.errors
        assert all(message.strip() for message in outcome.errors[field])
        assert not InstanceConfig.objects.exists()
        if field in SECRET_FIELDS:
            assert value not in str(outcome.errors)


UPDATABLE = [case for case in ODD_INPUT if case[0] in ("evolution_url", "evolution_key")]


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance(webhook_token="acme-webhook-token")


@pytest.mark.parametrize(
    ("field", "what", "value", "accepted"), UPDATABLE, ids=map(case_id, UPDATABLE)
)
@pytest.mark.parametrize("how", ["api patch", "cli update"])
def test_an_odd_update_is_refused_whole_or_stored(
    client: Client,
    api_key_headers,
    acme: InstanceConfig,
    how: str,
    field: str,
    what: str,
    value: str,
    accepted: Any,
) -> None:
    if isinstance(accepted, dict):
        accepted = accepted["api" if how == "api patch" else "cli"]
    before = snapshot(acme)
    # A valid change along with the odd one: it must not be saved on its own.
    fields = {"default_agent": "other_agent", field: value}
    if field == "evolution_url":
        # A URL on another host needs its key in the same change.
        fields["evolution_key"] = "acme-evolution-key"

    if how == "api patch":
        body = json.dumps(fields)
        outcome = api_outcome(
            client.patch(f"{API}acme/", body, content_type="application/json", **api_key_headers)
        )
    else:
        outcome = cli("update", "acme", *cli_options(fields))

    acme.refresh_from_db()
    if accepted:
        assert outcome.ok, outcome.errors
        assert (getattr(acme, field), acme.default_agent) == (value.strip(), "other_agent")
    else:
        assert not outcome.ok
        assert field in outcome.errors, outcome.errors
        assert snapshot(acme) == before


@pytest.mark.parametrize("interface", INTERFACES)
def test_a_rename_to_an_odd_name_is_refused(
    interface: str, admin_client: Client, client: Client, api_key_headers, acme: InstanceConfig
) -> None:
    if interface == "api":
        body = json.dumps({"name": "../acme"})
        response = client.patch(
            f"{API}acme/", body, content_type="application/json", **api_key_headers
        )
        assert response.status_code == 400
        assert "name" in response.json()
    elif interface == "cli":
        outcome = cli("update", "acme", "--name", "../acme")
        assert not outcome.ok
        assert any("cannot be renamed" in message for message in outcome.errors["name"])
    else:
        # The admin shows the name read-only: a posted name is ignored.
        data = admin_form(
            {
                **VALID,
                "name": "../acme",
                "evolution_url": acme.evolution_url,
                "agent_api_url": acme.agent_api_url,
                "evolution_key": "",
                "agent_api_key": "",
            }
        )
        response = admin_client.post(f"/admin/instances/instanceconfig/{acme.pk}/change/", data)
        assert response.status_code == 302
    assert list(InstanceConfig.objects.values_list("name", flat=True)) == ["acme"]
