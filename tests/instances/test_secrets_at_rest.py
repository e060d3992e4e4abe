"""Tenant secrets are encrypted in the database with OMNIHUB_ENCRYPTION_KEY."""

from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.checks import Error, Warning
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import override_settings

from instances import checks, crypto
from instances.fields import stored_length
from instances.models import SECRET_FIELDS, InstanceConfig
from omnihub.asgi import application
from tests.conftest import instance_fields
from webhooks import rows

OLD_KEY = Fernet.generate_key().decode()
NEW_KEY = Fernet.generate_key().decode()
SECRETS = {
    "evolution_key": "plain-evolution-key",
    "agent_api_key": "plain-agent-key",
    "webhook_token": "plain-webhook-token",
    "stt_key": "plain-stt-key",
    "callback_secret": "plain-callback-secret",
}
# The secrets migration 0006 encrypted (stt_key came later, encrypted from the start).
SECRETS_AT_0006 = {k: v for k, v in SECRETS.items() if k not in ("stt_key", "callback_secret")}
TABLE = InstanceConfig._meta.db_table
BEFORE = ("instances", "0005_permissions_and_token_rotation")
AFTER = ("instances", "0006_secrets_encrypted_at_rest")


def stored(name: str = "acme", fields: tuple[str, ...] = SECRET_FIELDS) -> dict[str, str]:
    """The secrets as the database holds them, not as the field reads them."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(fields)} FROM {TABLE} WHERE name = %s", [name])
        return dict(zip(fields, cursor.fetchone(), strict=True))


def store_raw(name: str, **values: str) -> None:
    with connection.cursor() as cursor:
        for field, value in values.items():
            cursor.execute(f"UPDATE {TABLE} SET {field} = %s WHERE name = %s", [value, name])


def keys(*values: str) -> Any:
    return override_settings(OMNIHUB_ENCRYPTION_KEYS=list(values))


def test_the_secrets_are_stored_encrypted_and_read_in_plain_text(make_instance):
    make_instance(**SECRETS)

    for field, value in stored().items():
        assert value.startswith("enc1:"), field
        assert SECRETS[field] not in value
    instance = InstanceConfig.objects.get(name="acme")
    assert {f: getattr(instance, f) for f in SECRET_FIELDS} == SECRETS


def test_the_webhook_lookup_reads_the_secrets_in_plain_text(make_instance):
    make_instance(**SECRETS)

    instance = rows.find_instance(name="acme")

    assert instance is not None
    assert {f: getattr(instance, f) for f in SECRET_FIELDS} == SECRETS


def test_a_plain_value_stored_before_encryption_is_still_read(make_instance):
    make_instance(**SECRETS)
    store_raw("acme", webhook_token="legacy-plain-token")

    assert InstanceConfig.objects.get(name="acme").webhook_token == "legacy-plain-token"
    assert rows.find_instance(name="acme").webhook_token == "legacy-plain-token"


def test_a_blank_secret_stays_blank_so_unset_ones_are_still_found(make_instance):
    make_instance(name="open", webhook_token="")
    make_instance(name="closed", webhook_token="a-token")

    assert stored("open")["webhook_token"] == ""
    assert list(InstanceConfig.objects.filter(webhook_token="").values_list("name", flat=True)) == [
        "open"
    ]


def test_the_column_holds_the_longest_secret_encrypted(make_instance):
    # PostgreSQL's varchar refuses a longer value; the column is sized for it.
    longest = "k" * 512
    make_instance(agent_api_key=longest)

    assert len(stored()["agent_api_key"]) <= stored_length(512)
    assert InstanceConfig.objects.get(name="acme").agent_api_key == longest


def test_a_secret_cannot_start_with_the_encryption_mark(db):
    instance = InstanceConfig(**instance_fields(agent_api_key="enc1:typed-by-hand"))

    with pytest.raises(ValidationError) as caught:
        instance.full_clean()

    assert "cannot start with 'enc1:'" in str(caught.value.message_dict["agent_api_key"])


def test_without_a_key_the_secrets_are_stored_as_they_are(make_instance):
    with keys():
        make_instance(**SECRETS)

    assert stored() == SECRETS


def test_rotate_secrets_re_encrypts_every_secret_with_the_first_key(make_instance, capsys):
    with keys(OLD_KEY):
        make_instance(**SECRETS)
    store_raw("acme", webhook_token="legacy-plain-token")
    before = stored()

    with keys(NEW_KEY, OLD_KEY):
        call_command("rotate_secrets")
    # Only the new key is needed from now on.
    with keys(NEW_KEY):
        instance = InstanceConfig.objects.get(name="acme")

    assert "Re-encrypted 5 secret(s) of 1 instance(s)" in capsys.readouterr().out
    after = stored()
    assert all(value.startswith("enc1:") for value in after.values())
    assert all(after[f] != before[f] for f in SECRET_FIELDS)
    assert instance.evolution_key == SECRETS["evolution_key"]
    assert instance.webhook_token == "legacy-plain-token"


def test_a_key_removed_before_rotating_gives_a_clear_error(make_instance):
    with keys(OLD_KEY):
        make_instance(**SECRETS)

    with keys(NEW_KEY), pytest.raises(crypto.UndecryptableSecret, match="rotate_secrets"):
        InstanceConfig.objects.get(name="acme")


def test_without_a_key_an_encrypted_secret_gives_a_clear_error_on_first_read(make_instance):
    make_instance(**SECRETS)

    with keys(), pytest.raises(crypto.EncryptionKeyMissing, match="OMNIHUB_ENCRYPTION_KEY"):
        rows.find_instance(name="acme")


def test_rotate_secrets_refuses_to_run_without_a_key(make_instance, capsys):
    with keys(), pytest.raises(CommandError) as exited:
        call_command("rotate_secrets")

    assert exited.value.returncode == 1
    assert "OMNIHUB_ENCRYPTION_KEY is not set" in capsys.readouterr().err


def test_the_database_check_refuses_encrypted_rows_without_a_key(make_instance):
    make_instance(**SECRETS)

    with keys():
        problems = checks.check_stored_secrets(databases=["default"])
        with pytest.raises(SystemCheckError, match=r"instances\.E002"):
            call_command("check", "--database", "default")

    assert [(type(p), p.id) for p in problems] == [(Error, "instances.E002")]
    assert "5 encrypted secret(s) stored" in problems[0].msg


def test_the_database_check_passes_with_the_right_key(make_instance):
    make_instance(**SECRETS)

    assert checks.check_stored_secrets(databases=["default"]) == []


def test_a_malformed_key_is_refused_by_the_checks(db):
    with keys("not-a-fernet-key"):
        problems = checks.check_encryption_key()
        with pytest.raises(ImproperlyConfigured, match="not a Fernet key"):
            crypto.encrypt("x")

    assert [p.id for p in problems] == ["instances.E001"]


def test_without_a_key_the_checks_warn_that_secrets_are_plain(db):
    with keys():
        problems = checks.check_encryption_key()

    assert [(type(p), p.id) for p in problems] == [(Warning, "instances.W001")]


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_server_refuses_to_start_without_the_key_of_its_rows():
    from asgiref.sync import sync_to_async

    await sync_to_async(InstanceConfig.objects.create)(**instance_fields(**SECRETS))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, str]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with keys():
        await application({"type": "lifespan"}, receive, send)

    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "OMNIHUB_ENCRYPTION_KEY is not set" in sent[0]["message"]


def migrate_to(target: tuple[str, str]) -> None:
    executor = MigrationExecutor(connection)
    executor.migrate([target])


def insert_plain_row(name: str) -> None:
    migrate_to(BEFORE)
    old = MigrationExecutor(connection).loader.project_state([BEFORE]).apps
    model = old.get_model("instances", "InstanceConfig")
    model.objects.create(**instance_fields(name=name, **SECRETS_AT_0006))


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_the_plain_secrets_already_stored():
    insert_plain_row("acme")
    old_fields = tuple(SECRETS_AT_0006)
    assert stored(fields=old_fields) == SECRETS_AT_0006

    migrate_to(AFTER)
    encrypted = stored(fields=old_fields)
    migrate_to(BEFORE)
    reverted = stored(fields=old_fields)
    call_command("migrate", verbosity=0)

    assert all(value.startswith("enc1:") for value in encrypted.values())
    assert reverted == SECRETS_AT_0006
    assert InstanceConfig.objects.get(name="acme").agent_api_key == SECRETS["agent_api_key"]


@pytest.mark.django_db(transaction=True)
def test_without_a_key_the_migration_leaves_the_secrets_plain():
    insert_plain_row("acme")

    with keys():
        migrate_to(AFTER)
        plain = stored(fields=tuple(SECRETS_AT_0006))
        # The model of today has columns of later migrations.
        call_command("migrate", verbosity=0)
        instance = InstanceConfig.objects.get(name="acme")

    assert plain == SECRETS_AT_0006
    assert instance.webhook_token == SECRETS["webhook_token"]
