"""Per-instance send keys: made, looked up and revoked here (the admin, the API and
the CLI call these). The key is shown once, at creation; only its SHA-256 is kept."""

from datetime import timedelta

from django.utils import timezone

from instances.models import SEND_KEY_PREFIX, InstanceConfig, SendKey, hash_send_key

# last_used_at is written at most this often per key: not a write per send.
LAST_USED_EVERY = timedelta(minutes=1)


def create_send_key(*, instance: InstanceConfig, name: str = "") -> tuple[SendKey, str]:
    """A new key for the instance: (its row, the key itself, never readable again)."""
    send_key = SendKey(instance=instance, name=name)
    key = send_key.set_new_key()
    send_key.full_clean()
    send_key.save()
    return send_key, key


def revoke_send_key(*, send_key: SendKey) -> bool:
    """Revoke it (kept, marked revoked, for the record); whether it was active."""
    now = timezone.now()
    revoked = SendKey.objects.filter(pk=send_key.pk, revoked_at__isnull=True).update(revoked_at=now)
    send_key.refresh_from_db(fields=["revoked_at"])
    return bool(revoked)


def is_send_key(given: str) -> bool:
    """Whether a header value is meant as a send key (not the operator's API key)."""
    return given.startswith(SEND_KEY_PREFIX)


def find_send_key(given: str) -> SendKey | None:
    """The active key this is, with its instance; None if it is none (or revoked).

    Found by its hash (a unique index): the database compares hashes of a random
    key, which tells an attacker nothing; the match is then checked in constant time.
    """
    if not is_send_key(given):
        return None
    found = (
        SendKey.objects.active()
        .select_related("instance")
        .filter(key_hash=hash_send_key(given))
        .first()
    )
    if found is None or not found.matches(given):
        return None
    now = timezone.now()
    if found.last_used_at is None or found.last_used_at < now - LAST_USED_EVERY:
        SendKey.objects.filter(pk=found.pk).update(last_used_at=now)
        found.last_used_at = now
    return found
