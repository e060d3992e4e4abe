"""`manage.py instances`: list, show, create, update, delete tenants."""

import json
from typing import Annotated, Any

import typer
from django.core.exceptions import ValidationError
from django_typer.management import TyperCommand, command

from instances import provisioning, services
from instances.cli import (
    changed_fields,
    fail,
    instance_to_dict,
    local_time,
    render_table,
    snapshot,
    validation_error_lines,
    yes_no,
)
from instances.models import (
    AGENT_KIND_FIELDS,
    CALLBACK_FIELDS,
    CONVERSATION_FIELDS,
    MAX_AGENT_TIMEOUT,
    MEDIA_FIELDS,
    OUTBOUND_FIELDS,
    REPLY_FIELDS,
    SECRET_FIELDS,
    InstanceConfig,
)

# The fields --set takes: the agent's kind and memory, and the conversation settings.
SET_FIELDS = (
    *AGENT_KIND_FIELDS,
    *REPLY_FIELDS,
    *MEDIA_FIELDS,
    *CALLBACK_FIELDS,
    *OUTBOUND_FIELDS,
    *CONVERSATION_FIELDS,
)

NameArg = Annotated[str, typer.Argument(help="The instance's name.", show_default=False)]
Json = Annotated[
    bool, typer.Option("--json", help="Print JSON (secrets as has_* booleans) and nothing else.")
]
EvolutionUrl = Annotated[
    str | None,
    typer.Option("--evolution-url", help="Evolution API URL, e.g. https://evolution.example.com."),
]
EvolutionKey = Annotated[str | None, typer.Option("--evolution-key", help="Evolution API key.")]
WhatsappInstance = Annotated[
    str | None,
    typer.Option(
        "--whatsapp-instance", help="The instance's name inside Evolution (blank: the name)."
    ),
]
AgentApiUrl = Annotated[str | None, typer.Option("--agent-api-url", help="Agent API URL.")]
AgentApiKey = Annotated[str | None, typer.Option("--agent-api-key", help="Agent API key.")]
DefaultAgent = Annotated[
    str | None, typer.Option("--default-agent", help="The agent that answers messages.")
]
# A string, converted by the model field, so a bad value gets the model's message.
AgentTimeout = Annotated[
    str | None,
    typer.Option(
        "--agent-timeout",
        metavar="SECONDS",
        help=f"Seconds to wait for the agent (1 to {MAX_AGENT_TIMEOUT}).",
    ),
]
SessionIdPrefix = Annotated[
    str | None,
    typer.Option(
        "--session-id-prefix", help="Prefix of the agent session names (blank: '<name>_')."
    ),
]
FallbackMessage = Annotated[
    str | None,
    typer.Option("--fallback-message", help="Sent when the agent fails for good (blank: nothing)."),
]
IsDefault = Annotated[
    bool | None,
    typer.Option(
        "--default/--no-default",
        help="The default instance answers the legacy route /webhook/evolution.",
        show_default=False,
    ),
]
IsActive = Annotated[
    bool | None,
    typer.Option(
        "--active/--inactive",
        help="Inactive: the bot does not answer; deliveries are still stored (as ignored).",
        show_default=False,
    ),
]
LegacyMode = Annotated[
    bool | None,
    typer.Option(
        "--legacy-mode/--no-legacy-mode",
        help="The single-tenant service's behaviour: session names without the instance's "
        "name; with no Evolution URL, replies through the server deliveries name (pinned).",
        show_default=False,
    ),
]
LegacyServerUrl = Annotated[
    str | None,
    typer.Option(
        "--legacy-server-url",
        help="Legacy mode without an Evolution URL: the only server replies go to "
        "(blank: pinned from the next delivery).",
    ),
]
WebhookToken = Annotated[
    str | None,
    typer.Option(
        "--webhook-token",
        metavar="TOKEN",
        help="Token deliveries must carry (header X-Webhook-Token or ?token=).",
    ),
]
NoWebhookToken = Annotated[
    bool,
    typer.Option(
        "--no-webhook-token",
        help="No token: the webhook accepts unauthenticated deliveries.",
    ),
]


Settings = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="A setting as NAME=VALUE, repeatable: "
        + ", ".join(SET_FIELDS)
        + " (agent_kind: automagik, openai or webhook). Lists as JSON or comma-separated, "
        "e.g. --set allow_list=5511*,5521*.",
    ),
]


BOOLEAN_WORDS = dict.fromkeys(("true", "yes", "on", "1"), True) | dict.fromkeys(
    ("false", "no", "off", "0"), False
)


def parse_settings(values: list[str] | None) -> dict[str, Any]:
    """--set NAME=VALUE pairs as field values; raises ValidationError naming the field."""
    fields: dict[str, Any] = {}
    for item in values or []:
        name, equals, raw = item.partition("=")
        name = name.strip()
        if not equals or name not in SET_FIELDS:
            raise ValidationError(
                f"--set {item!r}: use NAME=VALUE with NAME one of {', '.join(SET_FIELDS)}."
            )
        field = InstanceConfig._meta.get_field(name)
        if field.get_internal_type() == "JSONField":
            try:
                value = json.loads(raw) if raw.strip().startswith("[") else None
            except ValueError as exc:
                raise ValidationError({name: [f"Not a JSON list: {exc}."]}) from exc
            if value is None:
                value = [part.strip() for part in raw.split(",") if part.strip()]
            fields[name] = value
        elif field.get_internal_type() == "BooleanField":
            # Django's own conversion knows True/False/1/0 only; a shell user types
            # true, yes, on. Anything else goes on for the model's message.
            fields[name] = BOOLEAN_WORDS.get(raw.strip().lower(), raw)
        else:
            fields[name] = raw
    return fields


class Command(TyperCommand):
    help = (
        "Manage the tenants (instances): list, show, create, update, delete, set-default, "
        "provision."
    )

    @command(name="list")
    def list_instances(self, as_json: Json = False) -> None:
        """List the instances."""
        instances = list(InstanceConfig.objects.all())
        if as_json:
            self._print_json([instance_to_dict(i) for i in instances])
            return
        if not instances:
            self.echo("No instances.")
            return
        headers = ["NAME", "WHATSAPP INSTANCE", "AGENT", "DEFAULT", "ACTIVE", "TOKEN", "UPDATED"]
        rows = [
            [
                i.name,
                i.whatsapp_instance or "-",
                i.default_agent,
                yes_no(i.is_default),
                yes_no(i.is_active),
                yes_no(i.webhook_token),
                local_time(i.updated_at),
            ]
            for i in instances
        ]
        self.echo(render_table(headers, rows))

    @command()
    def show(self, name: NameArg, as_json: Json = False) -> None:
        """Show one instance; secrets appear only as set / not set."""
        instance = self._get(name)
        if as_json:
            self._print_json(instance_to_dict(instance))
            self._warn_if_no_token(instance)
            return
        rows = [
            ("name", instance.name),
            ("active", yes_no(instance.is_active)),
            ("default", yes_no(instance.is_default)),
            ("legacy mode", yes_no(instance.legacy_mode)),
            ("legacy reply server", instance.legacy_server_url or "-"),
            ("evolution url", instance.evolution_url or "-"),
            ("evolution key", _set_or_not(instance.evolution_key)),
            ("whatsapp instance", instance.whatsapp_instance or "-"),
            ("agent kind", instance.agent_kind),
            ("agent api url", instance.agent_api_url),
            ("agent api key", _set_or_not(instance.agent_api_key)),
            ("default agent", instance.default_agent),
            ("system prompt", instance.system_prompt.replace("\n", "\\n") or "-"),
            ("history limit", str(instance.history_limit)),
            ("agent timeout", f"{instance.agent_timeout}s"),
            ("session id prefix", instance.session_id_prefix or "-"),
            # One line per field: show a multi-line message with visible \n.
            ("fallback message", instance.fallback_message.replace("\n", "\\n") or "-"),
            ("webhook token", _set_or_not(instance.webhook_token)),
            ("webhook url", instance.webhook_url),
            ("created", local_time(instance.created_at)),
            ("updated", local_time(instance.updated_at)),
        ]
        width = max(len(label) for label, _ in rows) + 2
        for label, value in rows:
            self.echo(f"{label + ':':<{width}}{value}")
        # The names --set takes, in a block of their own.
        self.echo("reply, media and conversation settings:")
        shown = (
            *REPLY_FIELDS,
            *MEDIA_FIELDS,
            *CALLBACK_FIELDS,
            *OUTBOUND_FIELDS,
            *CONVERSATION_FIELDS,
        )
        width = max(map(len, shown)) + 3
        for name in shown:
            if name in SECRET_FIELDS:
                self.echo(
                    f"  {'has_' + name + ':':<{width}}{yes_no(bool(getattr(instance, name)))}"
                )
                continue
            self.echo(f"  {name + ':':<{width}}{_setting(getattr(instance, name))}")
        if not instance.webhook_token:
            self.echo(f"WARNING: {_no_token_warning(instance)}")

    @command()
    def create(
        self,
        name: Annotated[str, typer.Option("--name", help="Letters, digits, '_' and '-'.")],
        evolution_url: EvolutionUrl = None,
        evolution_key: EvolutionKey = None,
        whatsapp_instance: WhatsappInstance = None,
        agent_api_url: AgentApiUrl = None,
        agent_api_key: AgentApiKey = None,
        default_agent: DefaultAgent = None,
        agent_timeout: AgentTimeout = None,
        session_id_prefix: SessionIdPrefix = None,
        fallback_message: FallbackMessage = None,
        is_default: IsDefault = None,
        is_active: IsActive = None,
        legacy_mode: LegacyMode = None,
        legacy_server_url: LegacyServerUrl = None,
        webhook_token: WebhookToken = None,
        no_webhook_token: NoWebhookToken = False,
        set_values: Settings = None,
        as_json: Annotated[
            bool,
            typer.Option(
                "--json",
                help="Print JSON (secrets as has_* booleans) and nothing else. A generated "
                "webhook token is included once, under webhook_token.",
            ),
        ] = False,
    ) -> None:
        """Create an instance; a generated webhook token is printed this one time only."""
        instance = InstanceConfig()
        token_generated = webhook_token is None and not no_webhook_token
        self._apply(
            instance,
            settings=set_values,
            webhook_token=webhook_token,
            no_webhook_token=no_webhook_token,
            name=name,
            evolution_url=evolution_url,
            evolution_key=evolution_key,
            whatsapp_instance=whatsapp_instance,
            agent_api_url=agent_api_url,
            agent_api_key=agent_api_key,
            default_agent=default_agent,
            agent_timeout=agent_timeout,
            session_id_prefix=session_id_prefix,
            fallback_message=fallback_message,
            is_default=is_default,
            is_active=is_active,
            legacy_mode=legacy_mode,
            legacy_server_url=legacy_server_url,
        )
        self._save(instance)
        if as_json:
            data = instance_to_dict(instance)
            if token_generated:
                data["webhook_token"] = instance.webhook_token
            self._print_json(data)
        else:
            self.echo(f"Created instance '{instance.name}'.")
            self.echo(f"Webhook URL: {instance.webhook_url}")
            if token_generated:
                # The one place a secret is printed: the operator needs it for
                # Evolution and it cannot be read back later.
                self.echo(
                    f"Webhook token (shown only this once, store it now): {instance.webhook_token}"
                )
                self.echo(
                    "Evolution must send it as header X-Webhook-Token, or post to: "
                    f"{instance.webhook_url_with_token}"
                )
        self._warn_if_no_token(instance)

    @command()
    def update(
        self,
        name: NameArg,
        new_name: Annotated[
            str | None,
            typer.Option("--name", help="Refused: an instance cannot be renamed."),
        ] = None,
        evolution_url: EvolutionUrl = None,
        evolution_key: EvolutionKey = None,
        whatsapp_instance: WhatsappInstance = None,
        agent_api_url: AgentApiUrl = None,
        agent_api_key: AgentApiKey = None,
        default_agent: DefaultAgent = None,
        agent_timeout: AgentTimeout = None,
        session_id_prefix: SessionIdPrefix = None,
        fallback_message: FallbackMessage = None,
        is_default: IsDefault = None,
        is_active: IsActive = None,
        legacy_mode: LegacyMode = None,
        legacy_server_url: LegacyServerUrl = None,
        webhook_token: WebhookToken = None,
        no_webhook_token: NoWebhookToken = False,
        set_values: Settings = None,
        as_json: Json = False,
    ) -> None:
        """Change the given fields of an instance; the others keep their values."""
        instance = self._get(name)
        before = snapshot(instance)
        self._apply(
            instance,
            settings=set_values,
            webhook_token=webhook_token,
            no_webhook_token=no_webhook_token,
            # Passed through so the model, not the CLI, refuses a rename.
            name=new_name,
            evolution_url=evolution_url,
            evolution_key=evolution_key,
            whatsapp_instance=whatsapp_instance,
            agent_api_url=agent_api_url,
            agent_api_key=agent_api_key,
            default_agent=default_agent,
            agent_timeout=agent_timeout,
            session_id_prefix=session_id_prefix,
            fallback_message=fallback_message,
            is_default=is_default,
            is_active=is_active,
            legacy_mode=legacy_mode,
            legacy_server_url=legacy_server_url,
        )
        changed = changed_fields(before, instance)
        if changed:
            self._save(instance)
        if as_json:
            self._print_json(instance_to_dict(instance))
        elif changed:
            self.echo(f"Updated instance '{instance.name}': {', '.join(changed)}.")
        else:
            self.echo(f"Instance '{instance.name}' unchanged.")
        self._warn_if_no_token(instance)

    @command()
    def delete(
        self,
        name: NameArg,
        yes: Annotated[
            bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
        ] = False,
    ) -> None:
        """Delete an instance and its stored messages."""
        instance = self._get(name)
        if not yes and not typer.confirm(
            f"Delete instance '{name}' and its stored messages? Its webhook will answer 404.",
            default=False,
            err=True,
        ):
            fail(self, "Aborted: nothing deleted.")
        instance.delete()
        self.echo(f"Deleted instance '{name}'.")

    @command(name="set-default")
    def set_default(self, name: NameArg, as_json: Json = False) -> None:
        """Make an instance the default (it answers the legacy route /webhook/evolution)."""
        was_default = self._get(name).is_default
        try:
            instance = services.set_default_instance(name=name)
        except InstanceConfig.DoesNotExist:
            fail(self, _unknown(name))
        except ValidationError as exc:
            fail(self, *validation_error_lines(exc))
        if as_json:
            self._print_json(instance_to_dict(instance))
        elif was_default:
            self.echo(f"Instance '{name}' is already the default.")
        else:
            self.echo(f"Instance '{name}' is now the default.")
        self._warn_if_no_token(instance)

    @command()
    def provision(
        self,
        name: NameArg,
        force: Annotated[
            bool,
            typer.Option(
                "--force",
                help="Take the Evolution instance's webhook over even when it delivers to "
                "another tenant of this hub.",
            ),
        ] = False,
        as_json: Json = False,
    ) -> None:
        """Create the instance on Evolution unless it exists, and point its webhook here."""
        report = provisioning.provision(instance=self._get(name), force=force)
        if as_json:
            self._print_json(
                {
                    "ok": report.ok,
                    "detail": report.detail,
                    "steps": [
                        {"name": s.name, "ok": s.ok, "outcome": s.outcome, "message": s.message}
                        for s in report.steps
                    ],
                }
            )
        else:
            for step in report.steps:
                self.echo(f"{step.name}: {step.label}. {step.message}", err=not step.ok)
        if provisioning.needs_force(report) and not as_json:
            self.echo("Run again with --force to move the webhook to this tenant.", err=True)
        if not report.ok:
            raise typer.Exit(1)

    # --- helpers (not subcommands) ---
    def _get(self, name: str) -> InstanceConfig:
        try:
            return InstanceConfig.objects.get(name=name)
        except InstanceConfig.DoesNotExist:
            fail(self, _unknown(name))

    def _apply(
        self,
        instance: InstanceConfig,
        *,
        webhook_token: str | None,
        no_webhook_token: bool,
        settings: list[str] | None = None,
        **fields: Any,
    ) -> None:
        """Set the fields that were given; None means "not given"."""
        try:
            fields.update(parse_settings(settings))
        except ValidationError as exc:
            fail(self, *validation_error_lines(exc))
        if no_webhook_token:
            if webhook_token is not None:
                fail(self, "error: give either --webhook-token or --no-webhook-token, not both.")
            fields["webhook_token"] = ""
        else:
            fields["webhook_token"] = webhook_token
        errors: dict[str, list[str]] = {}
        for field, value in fields.items():
            if value is None:
                continue
            try:
                # Converted now so that update can tell "60" from a change of 60.
                value = InstanceConfig._meta.get_field(field).to_python(value)
            except ValidationError as exc:
                errors[field] = exc.messages
            setattr(instance, field, value)
        if errors:
            fail(self, *validation_error_lines(ValidationError(errors)))

    def _save(self, instance: InstanceConfig) -> None:
        try:
            services.save_instance(instance=instance)
        except ValidationError as exc:
            fail(self, *validation_error_lines(exc))

    def _print_json(self, data: object) -> None:
        self.echo(json.dumps(data, indent=2, ensure_ascii=False))

    def _warn_if_no_token(self, instance: InstanceConfig) -> None:
        if not instance.webhook_token:
            self.echo(f"warning: {_no_token_warning(instance)}", err=True)


def _unknown(name: str) -> str:
    return f"error: no instance named '{name}' (see `manage.py instances list`)."


def _setting(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(value) or "-"
    text = str(value)
    return text.replace("\n", "\\n") if text else "-"


def _set_or_not(secret: str) -> str:
    return "set" if secret else "not set"


def _no_token_warning(instance: InstanceConfig) -> str:
    return (
        f"instance '{instance.name}' has no webhook token: it accepts unauthenticated deliveries."
    )
