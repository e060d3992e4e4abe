"""System checks: the encryption key must open the secrets the database holds.

`manage.py migrate` (so `make run`) and `manage.py check --database default`
run the database check; the ASGI lifespan runs `secrets_problem` at start.
"""

from typing import Any

from django.core.checks import CheckMessage, Error, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections

from instances import crypto


def secrets_problem(*, using: str = "default") -> str | None:
    """Why the stored secrets cannot be read with the configured keys; None when they can."""
    from instances.models import SECRET_FIELDS, Agent, InstanceConfig

    try:
        crypto.check_keys()
    except ImproperlyConfigured as exc:
        return str(exc)
    rows: list[tuple] = []
    try:
        tables = connections[using].introspection.table_names()
        # The instances' secrets, and their routing agents' keys.
        for model, fields in ((InstanceConfig, SECRET_FIELDS), (Agent, ("agent_api_key",))):
            if model._meta.db_table in tables:  # else not migrated yet: nothing stored
                rows += crypto.raw_secret_rows(model=model, using=using, fields=fields)
    except DatabaseError:
        return None  # the database's own checks and errors say what is wrong
    values = [value for row in rows for value in row[1:] if value and crypto.is_encrypted(value)]
    for value in values:
        try:
            crypto.decrypt(value)
        except ImproperlyConfigured as exc:
            return f"{exc} ({len(values)} encrypted secret(s) stored)"
    return None


@register("security")
def check_encryption_key(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        crypto.check_keys()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="instances.E001")]
    if not crypto.configured_keys():
        return [
            Warning(
                f"{crypto.KEY_SETTING} is not set: tenant secrets are written in plain text.",
                hint="Set it to a Fernet key (`make run` writes one to .env), then run "
                "`manage.py rotate_secrets` to encrypt the secrets already stored.",
                id="instances.W001",
            )
        ]
    return []


@register("database")
def check_stored_secrets(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    problems = []
    for alias in databases or []:
        problem = secrets_problem(using=alias)
        if problem is not None:
            problems.append(Error(problem, id="instances.E002"))
    return problems
