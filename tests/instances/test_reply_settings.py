"""split_replies, typing_ms_per_char, send_media_links and quote_replies: the
model's rules, and the same names in the REST API, the admin and the CLI."""

from io import StringIO

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client

from instances.models import MAX_TYPING_MS_PER_CHAR, REPLY_FIELDS, InstanceConfig
from tests.conftest import instance_fields

TOO_SLOW = f"Ensure this value is less than or equal to {MAX_TYPING_MS_PER_CHAR}."


def test_an_existing_instance_keeps_sending_one_text_without_delay(make_instance) -> None:
    instance = make_instance()

    assert [getattr(instance, name) for name in REPLY_FIELDS] == [False, 0, True, False]


@pytest.mark.django_db
def test_the_model_refuses_typing_slower_than_a_second_a_character() -> None:
    with pytest.raises(ValidationError) as caught:
        InstanceConfig(
            **instance_fields(typing_ms_per_char=MAX_TYPING_MS_PER_CHAR + 1)
        ).full_clean()

    assert caught.value.message_dict["typing_ms_per_char"] == [TOO_SLOW]


def test_the_api_takes_and_shows_the_reply_settings_by_their_names(client: Client, db) -> None:
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY
    settings_in = {
        "split_replies": True,
        "typing_ms_per_char": 40,
        "send_media_links": False,
        "quote_replies": True,
    }

    created = client.post(
        "/api/v1/instances/",
        {**instance_fields(name="shaped"), **settings_in},
        content_type="application/json",
    )

    assert created.status_code == 201, created.content
    assert {name: created.json()[name] for name in REPLY_FIELDS} == settings_in


def test_the_api_refuses_a_typing_delay_out_of_range_in_the_models_words(
    client: Client, make_instance
) -> None:
    make_instance()
    client.defaults["HTTP_X_API_KEY"] = settings.OMNIHUB_API_KEY

    response = client.patch(
        "/api/v1/instances/acme/", {"typing_ms_per_char": 5000}, content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json()["typing_ms_per_char"] == [TOO_SLOW]


def test_the_admin_shows_the_replies_group(admin_client, make_instance) -> None:
    instance = make_instance()

    response = admin_client.get(f"/admin/instances/instanceconfig/{instance.pk}/change/")

    assert b"<h2>Replies</h2>" in response.content or b">Replies<" in response.content
    for name in REPLY_FIELDS:
        assert f'name="{name}"'.encode() in response.content


def run(*args: str) -> tuple[int, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("instances", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, err.getvalue()
    return 0, out.getvalue()


def test_the_cli_sets_the_reply_settings_and_shows_them(make_instance) -> None:
    make_instance()

    code, output = run(
        "update", "acme", "--set", "split_replies=true", "--set", "typing_ms_per_char=25"
    )

    assert code == 0, output
    stored = InstanceConfig.objects.get(name="acme")
    assert (stored.split_replies, stored.typing_ms_per_char) == (True, 25)
    _, shown = run("show", "acme")
    assert "split_replies:" in shown and "typing_ms_per_char:" in shown


def test_the_cli_refuses_a_typing_delay_out_of_range_in_the_models_words(make_instance) -> None:
    make_instance()

    code, err = run("update", "acme", "--set", "typing_ms_per_char=5000")

    assert code == 1
    assert TOO_SLOW in err
    assert InstanceConfig.objects.get(name="acme").typing_ms_per_char == 0
