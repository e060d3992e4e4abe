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
