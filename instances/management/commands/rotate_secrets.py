"""`manage.py rotate_secrets`: every tenant secret re-encrypted with the first key."""

from django.core.exceptions import ImproperlyConfigured
from django_typer.management import TyperCommand

from instances.cli import fail
from instances.services import rotate_secrets


class Command(TyperCommand):
    help = (
        "Re-encrypt every tenant secret with the first key of OMNIHUB_ENCRYPTION_KEY "
        "(plain ones included). To rotate: put the new key first, keep the old one after "
        "it, run this, then remove the old key."
    )

    def handle(self) -> None:
        try:
            report = rotate_secrets()
        except ImproperlyConfigured as exc:
            fail(self, f"error: {exc}")
        self.stdout.write(
            f"Re-encrypted {report.encrypted} secret(s) of {report.instances} instance(s) "
            "with the first key of OMNIHUB_ENCRYPTION_KEY."
        )
