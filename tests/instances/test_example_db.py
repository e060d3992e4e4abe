"""db.sqlite3.example: a database a newcomer can copy to db.sqlite3 and start with."""

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.db.migrations.loader import MigrationLoader

from instances.models import SECRET_FIELDS

EXAMPLE_DB = Path(settings.BASE_DIR) / "db.sqlite3.example"
PLACEHOLDER_MARKS = ("example", "replace-me")

# Migrate a new file, add the fake instance, and leave WAL mode so the data is
# all in the one file (the settings switch every SQLite connection to WAL).
REBUILD = (
    f"cd {settings.BASE_DIR} && rm -f db.sqlite3.example* && "
    f"export ENV_FILE= SECRET_KEY=x DATABASE_URL=sqlite:///{EXAMPLE_DB} && "
    ".venv/bin/python manage.py migrate && "
    ".venv/bin/python manage.py shell -c '"
    "from django.db import connection; "
    "from instances.models import InstanceConfig as I; "
    "from instances.services import save_instance; "
    'save_instance(instance=I(name="example", '
    'evolution_url="https://evolution.example.com", '
    'evolution_key="example-evolution-key-replace-me", whatsapp_instance="example", '
    'agent_api_url="https://agent.example.com", '
    'agent_api_key="example-agent-key-replace-me", '
    'webhook_token="example-token-replace-me")); '
    'connection.cursor().execute("PRAGMA journal_mode=DELETE")'
    "'"
)
HINT = f"Rebuild db.sqlite3.example with:\n{REBUILD}"


@pytest.fixture
def example_db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    assert EXAMPLE_DB.exists(), f"db.sqlite3.example is missing. {HINT}"
    # A copy, opened read-only: the test never changes the committed file.
    copy = tmp_path / "example.sqlite3"
    shutil.copyfile(EXAMPLE_DB, copy)
    conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()


def test_the_example_db_has_every_migration_on_disk(example_db):
    applied = set(example_db.execute("SELECT app, name FROM django_migrations").fetchall())
    # No connection: the graph of every installed app's migration files.
    graph = MigrationLoader(None, ignore_no_migrations=True).graph
    missing = []
    for key, migration in graph.nodes.items():
        # A squashed migration counts as applied when everything it replaces is.
        if key not in applied and not (migration.replaces and set(migration.replaces) <= applied):
            missing.append(".".join(key))

    assert not missing, f"db.sqlite3.example lacks {sorted(missing)}. {HINT}"


def test_the_example_db_holds_only_placeholder_secrets(example_db):
    rows = example_db.execute(
        f"SELECT name, {', '.join(SECRET_FIELDS)} FROM instances_instanceconfig"
    ).fetchall()

    assert [row[0] for row in rows] == ["example"], HINT
    for name, *secrets in rows:
        for field, value in zip(SECRET_FIELDS, secrets, strict=True):
            # Blank holds nothing to leak (the example has no speech-to-text key).
            assert not value or any(mark in value for mark in PLACEHOLDER_MARKS), (
                f"{name}.{field} in db.sqlite3.example is not a placeholder. {HINT}"
            )


def test_the_example_db_has_no_users(example_db):
    count = example_db.execute("SELECT COUNT(*) FROM auth_user").fetchone()[0]

    assert count == 0, f"db.sqlite3.example holds {count} user(s). {HINT}"


def test_the_example_db_is_self_contained(example_db):
    # In WAL mode, rows can sit in a -wal file that is not committed with it.
    mode = example_db.execute("PRAGMA journal_mode").fetchone()[0]

    assert mode != "wal", f"db.sqlite3.example is in WAL mode. {HINT}"
    assert not EXAMPLE_DB.with_name("db.sqlite3.example-wal").exists(), HINT
