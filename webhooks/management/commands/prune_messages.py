"""`manage.py prune_messages`: delete finished messages past the retention period."""

from typing import Annotated

import typer
from django_typer.management import TyperCommand

from instances.cli import local_time
from webhooks.services import PRUNE_CHUNK_SIZE, preview_prune, prune_messages, retention_days


class Command(TyperCommand):
    help = (
        "Delete replied, ignored and failed messages received more than DAYS days ago. "
        "Queued and processing messages are never deleted."
    )

    def handle(
        self,
        older_than: Annotated[
            int | None,
            typer.Option(
                "--older-than",
                metavar="DAYS",
                min=0,
                help="Age in days (default: MESSAGE_RETENTION_DAYS, 30 unless set).",
                show_default=False,
            ),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
        ] = False,
        chunk_size: Annotated[
            int,
            typer.Option(
                "--chunk-size",
                metavar="ROWS",
                min=1,
                help="Rows deleted per transaction (short SQLite locks).",
            ),
        ] = PRUNE_CHUNK_SIZE,
    ) -> None:
        days = retention_days() if older_than is None else older_than
        if dry_run:
            preview = preview_prune(older_than_days=days)
            counts = ", ".join(f"{status} {n}" for status, n in sorted(preview.by_status.items()))
            self.echo(
                f"Would delete {plural(preview.total, 'message')} received before "
                f"{local_time(preview.cutoff)} (older than {plural(days, 'day')})"
                + (f": {counts}." if counts else ".")
            )
            return
        deleted = prune_messages(older_than_days=days, chunk_size=chunk_size)
        self.echo(
            f"Deleted {plural(deleted, 'message')} received more than {plural(days, 'day')} ago."
        )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
