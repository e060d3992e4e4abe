"""`manage.py seed_default_instance`: the default tenant from the legacy variables."""

from typing import Annotated

import typer
from django.core.exceptions import ValidationError
from django_typer.management import TyperCommand

from instances.cli import changed_fields, fail, snapshot, validation_error_lines
from instances.services import MissingSetting, get_default_instance, seed_default_instance

# Validation errors name the variable to fix, not only the model field.
SETTING_OF_FIELD = {
    "agent_api_url": "agent_api_url (AGENT_API_URL)",
    "agent_api_key": "agent_api_key (AGENT_API_KEY)",
    "default_agent": "default_agent (DEFAULT_AGENT_NAME)",
    "agent_timeout": "agent_timeout (AGENT_API_TIMEOUT)",
    "whatsapp_instance": "whatsapp_instance (WHATSAPP_INSTANCE)",
    "session_id_prefix": "session_id_prefix (SESSION_ID_PREFIX)",
    "evolution_url": "evolution_url (EVOLUTION_API_URL)",
    "evolution_key": "evolution_key (EVOLUTION_API_KEY)",
    "webhook_token": "webhook_token (WEBHOOK_TOKEN)",
}


class Command(TyperCommand):
    help = (
        "Create the default instance from the legacy variables (AGENT_API_URL, "
        "AGENT_API_KEY, ...) when there is none; running it again changes nothing."
    )

    def handle(
        self,
        update: Annotated[
            bool,
            typer.Option(
                "--update", help="Rewrite the existing default instance from the variables."
            ),
        ] = False,
    ) -> None:
        existing = get_default_instance()
        before = snapshot(existing) if existing else {}
        try:
            result = seed_default_instance(update=update)
        except MissingSetting as exc:
            fail(self, f"error: {exc}")
        except ValidationError as exc:
            fail(
                self,
                "error: the default instance cannot be saved from the environment:",
                *validation_error_lines(exc, SETTING_OF_FIELD),
            )
        instance = result.instance
        if result.action == "created":
            self.echo(
                f"Created default instance '{instance.name}' "
                f"(agent {instance.default_agent} at {instance.agent_api_url})."
            )
        elif result.action == "updated":
            changed = ", ".join(changed_fields(before, instance))
            self.echo(f"Updated default instance '{instance.name}': {changed}.")
        else:
            self.echo(f"Default instance '{instance.name}' unchanged.")
        if not instance.webhook_token:
            self.echo(
                f"warning: default instance '{instance.name}' has no webhook token and "
                "accepts unauthenticated deliveries; set WEBHOOK_TOKEN and run "
                "`manage.py seed_default_instance --update`.",
                err=True,
            )
