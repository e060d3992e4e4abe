"""Output helpers shared by the tenant management commands."""

from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import typer
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.utils import timezone
from django_typer.management import TyperCommand

from instances.models import SECRET_FIELDS, InstanceConfig


def instance_to_dict(instance: InstanceConfig) -> dict[str, Any]:
    """Every field of the instance, each secret replaced by a has_<field> boolean."""
    data: dict[str, Any] = {}
    for field in instance._meta.concrete_fields:
        if field.primary_key or field.name == "previous_webhook_token":
            # The replaced token is still accepted for a while: as secret as the current one.
            continue
        value = getattr(instance, field.attname)
        if field.name in SECRET_FIELDS:
            data[f"has_{field.name}"] = bool(value)
        else:
            data[field.name] = value.isoformat() if hasattr(value, "isoformat") else value
    data["webhook_url"] = instance.webhook_url
    return data


def snapshot(instance: InstanceConfig) -> dict[str, Any]:
    """The editable values, to tell afterwards which fields a command changed."""
    return {
        field.attname: getattr(instance, field.attname)
        for field in instance._meta.concrete_fields
        if field.editable and not field.primary_key
    }


def changed_fields(before: dict[str, Any], instance: InstanceConfig) -> list[str]:
    return [name for name, value in before.items() if getattr(instance, name) != value]


def validation_error_lines(
    exc: ValidationError, labels: Mapping[str, str] | None = None
) -> list[str]:
    """One `error: <field>: <message>` line per message, in the model's own words."""
    if not hasattr(exc, "error_dict"):
        return [f"error: {message}" for message in exc.messages]
    lines = []
    for field, messages in exc.message_dict.items():
        label = (labels or {}).get(field, field)
        prefix = "error: " if field == NON_FIELD_ERRORS else f"error: {label}: "
        lines.extend(prefix + message for message in messages)
    return lines


def fail(command: TyperCommand, *lines: str) -> NoReturn:
    """Explain on stderr and exit 1: no traceback, whoever called the command."""
    for line in lines:
        command.echo(line, err=True)
    raise typer.Exit(1)


def yes_no(value: object) -> str:
    return "yes" if value else "no"


def local_time(value: Any) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M") if value else "-"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
