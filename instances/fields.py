"""Model fields of the tenant registry."""

from typing import Any

from django.db import models

from instances import crypto

# A Fernet token of n bytes: version (1) + timestamp (8) + IV (16) + the AES-CBC
# ciphertext (n padded up to the next 16) + HMAC (32), in url-safe base64.
_FERNET_OVERHEAD = 1 + 8 + 16 + 32


def stored_length(max_length: int) -> int:
    """The longest stored text of a value of max_length characters (4 UTF-8 bytes each)."""
    raw = _FERNET_OVERHEAD + (4 * max_length // 16 + 1) * 16
    return len(crypto.PREFIX) + 4 * -(-raw // 3)


class EncryptedCharField(models.CharField):
    """A CharField stored encrypted (instances/crypto.py) and read back in plain text.

    `max_length` is the plain value's limit, as forms, the API and validation
    see it; the column is as wide as its encrypted form. A stored value without
    the encryption prefix (written before encryption, or without a key) is read
    as it is. Blank stays blank in the database, so `filter(field="")` still
    finds the unset ones; any other lookup compares ciphertexts and finds nothing.
    """

    def db_type_parameters(self, connection: Any) -> dict[str, Any]:
        # The column's type is built from these (varchar(%(max_length)s)).
        parameters = dict(super().db_type_parameters(connection))
        if self.max_length is not None:
            parameters["max_length"] = stored_length(self.max_length)
        return parameters

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        # Also called by webhooks/rows.py's plain-SQL tenant lookup.
        return value if value is None else crypto.decrypt(value)

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        return crypto.encrypt(value) if isinstance(value, str) else value
