"""Tenant secrets encrypted at rest with the keys of OMNIHUB_ENCRYPTION_KEY.

OMNIHUB_ENCRYPTION_KEY holds one or more comma-separated Fernet keys
(`cryptography`'s authenticated AES-128-CBC + HMAC-SHA256 tokens). The first key
encrypts; every key decrypts (MultiFernet), so a key is rotated by putting a
new one first, running `manage.py rotate_secrets`, then removing the old one.

A stored encrypted value is PREFIX + the Fernet token. A value without the
prefix is a plain one (written before encryption existed, or while no key is
set) and is read as it is: that is what lets an existing database keep working
and be encrypted row by row.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction

from instances.validators import ENCRYPTED_PREFIX

PREFIX = ENCRYPTED_PREFIX
KEY_SETTING = "OMNIHUB_ENCRYPTION_KEY"


class EncryptionKeyMissing(ImproperlyConfigured):
    """An encrypted secret was read while no key is configured."""


class UndecryptableSecret(ImproperlyConfigured):
    """An encrypted secret matches none of the configured keys."""


def configured_keys() -> tuple[str, ...]:
    return tuple(settings.OMNIHUB_ENCRYPTION_KEYS)


@cache
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(
            f"{KEY_SETTING} holds a value that is not a Fernet key (32 url-safe base64 "
            "bytes, e.g. from `python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())'`); several keys are comma-separated."
        ) from exc


def check_keys() -> None:
    """Raise ImproperlyConfigured when a configured key is malformed."""
    keys = configured_keys()
    if keys:
        _fernet(keys)


def is_encrypted(value: str) -> bool:
    return value.startswith(PREFIX)


def encrypt(value: str) -> str:
    """The value as stored: encrypted with the first key; blank stays blank.

    Without a key the value is stored as it is (see README, Security): a fresh
    `make run` always has one, an older deployment keeps working unchanged.
    """
    keys = configured_keys()
    if not value or not keys:
        return value
    return PREFIX + _fernet(keys).encrypt(value.encode()).decode("ascii")


# The webhook token is read on every delivery (the tenant lookup converts each
# row): a Fernet decrypt costs ~20 µs, a hit here well under 1 µs. The mapping
# token -> plain text never changes for a set of keys, so it needs no expiry.
@lru_cache(maxsize=4096)
def _decrypt(keys: tuple[str, ...], token: str) -> str:
    try:
        return _fernet(keys).decrypt(token.encode("ascii")).decode()
    except (InvalidToken, UnicodeError) as exc:
        raise UndecryptableSecret(
            f"A stored tenant secret cannot be decrypted with any key of {KEY_SETTING}: "
            "was a key removed before `manage.py rotate_secrets` re-encrypted everything "
            "with the new one? Put the old key back (after the new one) and run it."
        ) from exc


def decrypt(value: str) -> str:
    """The plain text of a stored value; a value without the prefix is already plain."""
    if not value.startswith(PREFIX):
        return value
    keys = configured_keys()
    if not keys:
        raise EncryptionKeyMissing(
            f"{KEY_SETTING} is not set, but the database holds encrypted tenant secrets. "
            "Set it (in the environment or .env) to the key they were encrypted with."
        )
    return _decrypt(keys, value[len(PREFIX) :])


@dataclass(frozen=True)
class SecretsReport:
    """What a pass over the tenants' secrets found or changed."""

    instances: int
    encrypted: int
    plain: int


def raw_secret_rows(
    *, model: type, using: str, fields: Sequence[str], lock: bool = False
) -> list[tuple]:
    # The stored text, not the field's decrypted value: whether a value is
    # plain or encrypted is the question here.
    connection = connections[using]
    quote = connection.ops.quote_name
    columns = ", ".join(
        quote(column)
        for column in (model._meta.pk.column, *(model._meta.get_field(f).column for f in fields))
    )
    sql = f"SELECT {columns} FROM {quote(model._meta.db_table)}"
    if lock and connection.features.has_select_for_update:
        sql += " FOR UPDATE"
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def secrets_report(*, model: type, using: str = "default", fields: Sequence[str]) -> SecretsReport:
    rows = raw_secret_rows(model=model, using=using, fields=fields)
    values = [value for row in rows for value in row[1:] if value]
    encrypted = sum(1 for value in values if is_encrypted(value))
    return SecretsReport(instances=len(rows), encrypted=encrypted, plain=len(values) - encrypted)


def encrypt_stored_secrets(
    *, model: type, using: str = "default", fields: Sequence[str], only_plain: bool
) -> SecretsReport:
    """Write every secret again with the first key; returns how many were written.

    `only_plain` (the data migration) leaves encrypted values alone; otherwise
    (`rotate_secrets`) every value is decrypted with whichever key opens it and
    encrypted with the first one. An `.update()`, so `updated_at` is untouched.
    """
    if not configured_keys():
        raise EncryptionKeyMissing(f"{KEY_SETTING} is not set: there is no key to encrypt with.")
    written = 0
    with transaction.atomic(using=using):
        for pk, *values in raw_secret_rows(model=model, using=using, fields=fields, lock=True):
            changes = {
                field: decrypt(value)
                for field, value in zip(fields, values, strict=True)
                if value and not (only_plain and is_encrypted(value))
            }
            if changes:
                # The field's get_prep_value encrypts them with the first key.
                model._base_manager.using(using).filter(pk=pk).update(**changes)
                written += len(changes)
    report = secrets_report(model=model, using=using, fields=fields)
    return SecretsReport(instances=report.instances, encrypted=written, plain=report.plain)


def decrypt_stored_secrets(*, model: type, using: str = "default", fields: Sequence[str]) -> int:
    """Store every secret in plain text again (the data migration's reverse)."""
    connection = connections[using]
    quote = connection.ops.quote_name
    written = 0
    with transaction.atomic(using=using):
        for pk, *values in raw_secret_rows(model=model, using=using, fields=fields, lock=True):
            for field, value in zip(fields, values, strict=True):
                if value and is_encrypted(value):
                    column = quote(model._meta.get_field(field).column)
                    with connection.cursor() as cursor:
                        cursor.execute(
                            f"UPDATE {quote(model._meta.db_table)} SET {column} = %s "
                            f"WHERE {quote(model._meta.pk.column)} = %s",
                            [decrypt(value), pk],
                        )
                    written += 1
    return written
