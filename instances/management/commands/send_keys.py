"""`manage.py send_keys`: an instance's send keys (create shows the key once, list, revoke)."""

import json
from typing import Annotated, Any

import typer
from django.core.exceptions import ValidationError
from django_typer.management import TyperCommand, command

from instances.cli import fail, local_time, render_table, validation_error_lines
from instances.models import InstanceConfig, SendKey
from instances.send_keys import create_send_key, revoke_send_key

InstanceArg = Annotated[str, typer.Argument(help="The instance's name.", show_default=False)]
IdArg = Annotated[int, typer.Argument(help="The key's id (see `list`).", show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON and nothing else.")]
Name = Annotated[str, typer.Option("--name", help="What uses the key, e.g. crm (optional).")]
All = Annotated[bool, typer.Option("--all", help="Revoked keys too.")]


def send_key_to_dict(send_key: SendKey) -> dict[str, Any]:
    return {
        "id": send_key.pk,
        "name": send_key.name,
        "prefix": send_key.shown_prefix,
        "created_at": send_key.created_at.isoformat(),
        "last_used_at": send_key.last_used_at.isoformat() if send_key.last_used_at else None,
        "revoked_at": send_key.revoked_at.isoformat() if send_key.revoked_at else None,
    }


class Command(TyperCommand):
    help = (
        "Manage an instance's send keys: create (the key is printed once), list, revoke. "
        "A send key (header x-api-key) may send messages through its instance and do "
        "nothing else."
    )

    @command()
    def create(self, instance: InstanceArg, name: Name = "", as_json: Json = False) -> None:
        """Make a key; it is printed this once (only its hash is stored)."""
        try:
            send_key, key = create_send_key(instance=self._instance(instance), name=name)
        except ValidationError as exc:
            fail(self, *validation_error_lines(exc))
        if as_json:
            self.echo(json.dumps({"id": send_key.pk, "key": key}, indent=2))
            return
        self.echo(f"Created send key {send_key.pk} for instance '{instance}':")
        self.echo(key)
        self.echo("Copy it now: it is not shown again. Send it as header x-api-key.")

    @command(name="list")
    def list_keys(
        self, instance: InstanceArg, all_keys: All = False, as_json: Json = False
    ) -> None:
        """List the instance's active keys (--all: revoked ones too); never the keys."""
        keys = self._instance(instance).send_keys.all()
        if not all_keys:
            keys = keys.filter(revoked_at__isnull=True)
        found = list(keys)
        if as_json:
            self.echo(json.dumps([send_key_to_dict(k) for k in found], indent=2))
            return
        if not found:
            self.echo(f"Instance '{instance}' has no send keys.")
            return
        rows = [
            [
                str(k.pk),
                k.name or "-",
                f"{k.shown_prefix}…",
                local_time(k.created_at),
                local_time(k.last_used_at),
                "active" if k.is_active else f"revoked {local_time(k.revoked_at)}",
            ]
            for k in found
        ]
        self.echo(render_table(["ID", "NAME", "KEY", "CREATED", "LAST USED", "STATE"], rows))

    @command()
    def revoke(self, instance: InstanceArg, key_id: IdArg) -> None:
        """Revoke a key: refused from now on."""
        try:
            send_key = self._instance(instance).send_keys.get(pk=key_id)
        except SendKey.DoesNotExist:
            fail(self, f"error: instance '{instance}' has no send key {key_id} (see `list`).")
        if revoke_send_key(send_key=send_key):
            self.echo(f"Revoked send key {key_id} of instance '{instance}'.")
        else:
            self.echo(f"Send key {key_id} of instance '{instance}' was already revoked.")

    def _instance(self, name: str) -> InstanceConfig:
        try:
            return InstanceConfig.objects.get(name=name)
        except InstanceConfig.DoesNotExist:
            fail(self, f"error: no instance named '{name}' (see `manage.py instances list`).")
