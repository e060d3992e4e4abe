"""Operations on the message log. Admin, REST API and CLI call these."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, QuerySet
from django.utils import timezone

from webhooks.models import InboundMessage, Status
from webhooks.transitions import retry_messages

__all__ = ["preview_prune", "prune_messages", "retry_messages", "retry_problem"]

FINISHED = (Status.REPLIED, Status.IGNORED, Status.FAILED)
PRUNE_CHUNK_SIZE = 5000


def retry_problem(*, message: InboundMessage) -> str | None:
    """Why this message cannot be retried, in words for the operator; None if it can."""
    if message.status != Status.FAILED:
        return f"Only failed messages can be retried; this one is {message.status}."
    if message.instance.is_legacy and not message.reply_api_key:
        return (
            "This message came in on the legacy route, whose Evolution key is not kept once "
            "a message is finished: set the default instance's Evolution URL and key to "
            "retry it."
        )
    return None


def retention_days() -> int:
    return getattr(settings, "MESSAGE_RETENTION_DAYS", 30)


def _finished_before(cutoff: datetime) -> QuerySet[InboundMessage]:
    return InboundMessage.objects.filter(received_at__lt=cutoff, status__in=FINISHED)


@dataclass(frozen=True)
class PrunePreview:
    cutoff: datetime
    by_status: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def preview_prune(*, older_than_days: int) -> PrunePreview:
    """What prune_messages would delete, counted by status."""
    cutoff = timezone.now() - timedelta(days=older_than_days)
    rows = _finished_before(cutoff).order_by().values_list("status").annotate(count=Count("id"))
    return PrunePreview(cutoff=cutoff, by_status=dict(rows))


def prune_messages(*, older_than_days: int, chunk_size: int = PRUNE_CHUNK_SIZE) -> int:
    """Delete finished messages older than `older_than_days` days; returns how many.

    Deletes `chunk_size` rows per transaction, so a big table never holds
    SQLite's write lock for long (webhooks and the worker write in between).
    Queued and processing rows are never deleted.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    old = _finished_before(timezone.now() - timedelta(days=older_than_days))
    deleted = 0
    while True:
        ids = list(old.order_by().values_list("pk", flat=True)[:chunk_size])
        if not ids:
            return deleted
        # The conditions again: a row retried since it was selected is queued now.
        count, _ = old.filter(pk__in=ids).delete()
        deleted += count
        if len(ids) < chunk_size:
            return deleted
