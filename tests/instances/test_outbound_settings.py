"""send_interval_ms, daily_send_limit, warmup_days and send_backoff_minutes: the
model's rules, and the same names in the REST API, the admin and the CLI."""

from io import StringIO

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client

from instances.models import MAX_SEND_BACKOFF_MINUTES, OUTBOUND_FIELDS, InstanceConfig
from tests.conftest import instance_fields

TOO_LONG = f"Ensure this value is less than or equal to {MAX_SEND_BACKOFF_MINUTES}."


def test_an_instance_sends_once_a_second_without_a_daily_limit_by_default(make_instance) -> None:
    instance = make_instance()

    assert [getattr(instance, name) for name in OUTBOUND_FIELDS] == [1000, 0, 0, 5]


@pytest.mark.django_db
def test_the_model_refuses_a_backoff_over_an_hour_or_of_nothing() -> None:
    for minutes in (0, MAX_SEND_BACKOFF_MINUTES + 1):
        with pytest.raises(ValidationError) as caught:
            InstanceConfig(**instance_fields(send_backoff_minutes=minutes)).full_clean()
        assert list(caught.value.message_dict) == ["send_backoff_minutes"]


def test_the_api_takes_and_shows_the_outbound_settings_by_their_names(client: Client, db) -> None:
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY
    settings_in = {
        "send_interval_ms": 2500,
        "daily_send_limit": 200,
        "warmup_days": 7,
        "send_backoff_minutes": 10,
    }

    created = client.post(
        "/api/v1/instances/",
        {**instance_fields(name="paced"), **settings_in},
        content_type="application/json",
    )

    assert created.status_code == 201, created.content
    assert {name: created.json()[name] for name in OUTBOUND_FIELDS} == settings_in


def test_the_api_refuses_a_backoff_out_of_range_in_the_models_words(
    client: Client, make_instance
) -> None:
    make_instance()
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY

    response = client.patch(
        "/api/v1/instances/acme/", {"send_backoff_minutes": 90}, content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json()["send_backoff_minutes"] == [TOO_LONG]


def test_the_admin_shows_the_outbound_group_with_the_outbox_now(
    admin_client, make_instance
) -> None:
    instance = make_instance()

    response = admin_client.get(f"/admin/instances/instanceconfig/{instance.pk}/change/")

    assert b">Outbound<" in response.content
    for name in OUTBOUND_FIELDS:
        assert f'name="{name}"'.encode() in response.content
    assert b"0 queued; nothing sent through the outbox yet" in response.content


def run(*args: str) -> tuple[int, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("instances", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, err.getvalue()
    return 0, out.getvalue()


def test_the_cli_sets_the_outbound_settings_and_shows_them(make_instance) -> None:
    make_instance()

    code, output = run(
        "update", "acme", "--set", "send_interval_ms=3000", "--set", "daily_send_limit=50"
    )

    assert code == 0, output
    stored = InstanceConfig.objects.get(name="acme")
    assert (stored.send_interval_ms, stored.daily_send_limit) == (3000, 50)
    _, shown = run("show", "acme")
    assert "send_interval_ms:" in shown and "daily_send_limit:" in shown


def test_the_cli_refuses_a_backoff_out_of_range_in_the_models_words(make_instance) -> None:
    make_instance()

    code, err = run("update", "acme", "--set", "send_backoff_minutes=90")

    assert code == 1
    assert TOO_LONG in err
