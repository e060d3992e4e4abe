import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

from instances.models import InstanceConfig

TABLE = InstanceConfig._meta.db_table


def table_names() -> list[str]:
    return connection.introspection.table_names()


def pending_migrations() -> list[object]:
    executor = MigrationExecutor(connection)
    return executor.migration_plan(executor.loader.graph.leaf_nodes())


@pytest.mark.django_db(transaction=True)
def test_the_migrations_run_from_zero_to_the_latest():
    # Unapplying instances also unapplies every app that depends on it (webhooks).
    call_command("migrate", "instances", "zero", verbosity=0)
    assert TABLE not in table_names()
    assert pending_migrations()

    call_command("migrate", verbosity=0)

    assert TABLE in table_names()
    assert pending_migrations() == []


@pytest.mark.django_db(transaction=True)
def test_the_migrated_database_allows_only_one_default():
    call_command("migrate", "instances", "zero", verbosity=0)
    call_command("migrate", verbosity=0)

    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, TABLE)
    assert constraints["instances_one_default"]["unique"]

    fields = {"agent_api_url": "http://agent.test", "agent_api_key": "k"}
    InstanceConfig.objects.create(name="one", is_default=True, **fields)
    InstanceConfig.objects.create(name="two", **fields)
    InstanceConfig.objects.create(name="three", **fields)  # many non-defaults are fine
    with pytest.raises(IntegrityError), transaction.atomic():
        InstanceConfig.objects.filter(name="two").update(is_default=True)


@pytest.mark.django_db
def test_the_models_need_no_new_migration():
    # Exits with status 1 when a model change has no migration yet.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


@pytest.mark.django_db(transaction=True)
def test_the_default_of_before_legacy_mode_keeps_its_behaviour_and_pins_its_server():
    before = [("instances", "0006_secrets_encrypted_at_rest"), ("webhooks", "0004_permissions")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    instances = old.get_model("instances", "InstanceConfig")
    fields = {"agent_api_url": "http://agent.test", "agent_api_key": "k"}
    default = instances.objects.create(name="default", is_default=True, **fields)
    instances.objects.create(
        name="acme", evolution_url="http://evo.test", evolution_key="k", **fields
    )
    messages = old.get_model("webhooks", "InboundMessage")
    common = {"instance": default, "chat_jid": "1@s.whatsapp.net", "payload": {}}
    for number, (status, server) in enumerate(
        [("replied", "https://evolution.shop.test"), ("failed", "https://relay.attacker.test")]
    ):
        messages.objects.create(
            message_id=f"M{number}", status=status, reply_server_url=server, **common
        )

    call_command("migrate", verbosity=0)

    migrated = {i.name: i for i in InstanceConfig.objects.all()}
    # The default's session names and replies stay as they were; the server
    # Evolution really answered from is the pin, not a stranger's.
    assert migrated["default"].legacy_mode is True
    assert migrated["default"].legacy_server_url == "https://evolution.shop.test"
    assert (migrated["acme"].legacy_mode, migrated["acme"].legacy_server_url) == (False, "")
