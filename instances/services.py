"""Business operations on tenants. Admin, REST API and CLI call these."""

from dataclasses import dataclass
from typing import Literal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from instances import crypto
from instances.models import KEY_OF_URL, SECRET_FIELDS, Agent, InstanceConfig, Route
from instances.validators import DEFAULT_AGENT_NAME

DEFAULT_INSTANCE_NAME = "default"


class MissingSetting(Exception):
    """A variable the operation needs is not set."""


def save_instance(*, instance: InstanceConfig) -> InstanceConfig:
    """Validate with the model's rules and save; raises ValidationError."""
    with transaction.atomic():
        if instance.is_default:
            # Making this one default takes the flag from the others in the
            # same transaction, so there is never zero or two defaults.
            InstanceConfig.objects.filter(is_default=True).exclude(pk=instance.pk).update(
                is_default=False
            )
        instance.full_clean()
        instance.save()
    return instance


def set_default_instance(*, name: str) -> InstanceConfig:
    with transaction.atomic():
        instance = InstanceConfig.objects.select_for_update().get(name=name)
        InstanceConfig.objects.filter(is_default=True).exclude(pk=instance.pk).update(
            is_default=False
        )
        if not instance.is_default:
            instance.is_default = True
            instance.full_clean()
            instance.save(update_fields=["is_default", "updated_at"])
    return instance


def pin_legacy_server(*, instance_id: int, server_url: str) -> str:
    """Pin the legacy reply server unless one is pinned already; the pinned one.

    Two first deliveries at once (two servers) pin one: the UPDATE only
    writes a blank value, and the later one reads the winner's.
    """
    InstanceConfig.objects.filter(pk=instance_id, legacy_server_url="").update(
        legacy_server_url=server_url
    )
    return str(
        InstanceConfig.objects.filter(pk=instance_id)
        .values_list("legacy_server_url", flat=True)
        .get()
    )


def get_default_instance() -> InstanceConfig | None:
    return InstanceConfig.objects.filter(is_default=True).first()


def default_instance_fields_from_settings() -> dict[str, object]:
    if not settings.AGENT_API_KEY:
        raise MissingSetting(
            "AGENT_API_KEY is not set: the default instance needs the agent's API key. "
            "Set it in the environment or in .env."
        )
    return {
        "agent_api_url": settings.AGENT_API_URL,
        "agent_api_key": settings.AGENT_API_KEY,
        "default_agent": settings.DEFAULT_AGENT_NAME,
        "agent_timeout": settings.AGENT_API_TIMEOUT,
        "whatsapp_instance": settings.WHATSAPP_INSTANCE,
        "session_id_prefix": settings.SESSION_ID_PREFIX,
        "evolution_url": settings.EVOLUTION_API_URL,
        "evolution_key": settings.EVOLUTION_API_KEY,
        # The old route took unauthenticated deliveries: no token unless asked for.
        "webhook_token": settings.WEBHOOK_TOKEN,
    }


@dataclass(frozen=True)
class SeedResult:
    action: Literal["created", "updated", "unchanged"]
    instance: InstanceConfig


def seed_default_instance(*, update: bool = False) -> SeedResult:
    """Create the default instance from the legacy variables when there is none."""
    fields = default_instance_fields_from_settings()
    with transaction.atomic():
        existing = InstanceConfig.objects.select_for_update().filter(is_default=True).first()
        if existing is None:
            # The old service's behaviour, chosen explicitly: sessions keep its
            # names, and without EVOLUTION_API_URL replies go to the pinned server.
            instance = InstanceConfig(
                name=DEFAULT_INSTANCE_NAME, is_default=True, legacy_mode=True, **fields
            )
            return SeedResult("created", save_instance(instance=instance))
        if not update:
            return SeedResult("unchanged", existing)
        if not settings.WEBHOOK_TOKEN:
            # An unset WEBHOOK_TOKEN never removes a token set since (admin, API,
            # CLI): that would silently open the route to anyone.
            fields.pop("webhook_token")
        changed = [k for k, v in fields.items() if getattr(existing, k) != v]
        if not changed:
            return SeedResult("unchanged", existing)
        for key in changed:
            setattr(existing, key, fields[key])
        for url, key in KEY_OF_URL.items():
            if url in changed:
                # The environment gives the key with the URL, even when it is unchanged.
                setattr(existing, key, fields[key])
        return SeedResult("updated", save_instance(instance=existing))


def rotate_secrets() -> crypto.SecretsReport:
    """Every stored secret re-encrypted with the first OMNIHUB_ENCRYPTION_KEY key.

    Plain ones (written before a key was set) are encrypted too. Raises
    crypto.EncryptionKeyMissing without a key, crypto.UndecryptableSecret when
    a value opens with none of the keys (nothing is written then).
    """
    # One transaction: the instances' other agents (routing) keep their keys the same
    # way, and an undecryptable one leaves every secret as it was.
    with transaction.atomic():
        report = crypto.encrypt_stored_secrets(
            model=InstanceConfig, fields=SECRET_FIELDS, only_plain=False
        )
        agents = crypto.encrypt_stored_secrets(
            model=Agent, fields=("agent_api_key",), only_plain=False
        )
    return crypto.SecretsReport(
        instances=report.instances,
        encrypted=report.encrypted + agents.encrypted,
        plain=report.plain + agents.plain,
    )


# --- an instance's other agents and its routing rules -----------------------------
def save_agent(*, agent: Agent) -> Agent:
    """Validate with the model's rules and save; raises ValidationError."""
    with transaction.atomic():
        agent.full_clean()
        agent.save()
    return agent


def agent_in_use(*, agent: Agent) -> str | None:
    """Why the agent cannot be deleted (rules point at it), or None."""
    positions = list(agent.routes.order_by("position", "id").values_list("position", flat=True))
    if not positions:
        return None
    listed = ", ".join(map(str, positions))
    return (
        f"Agent '{agent.name}' is used by the routing rules at position {listed}: delete "
        "them or point them at another agent first."
    )


def delete_agent(*, agent: Agent) -> None:
    """Delete an agent no rule points at (its chats go back to the default agent);
    raises ValidationError otherwise."""
    with transaction.atomic():
        refusal = agent_in_use(agent=agent)
        if refusal:
            raise ValidationError(refusal)
        agent.delete()


def save_route(*, route: Route) -> Route:
    """Validate with the model's rules and save (no position: after the last rule)."""
    with transaction.atomic():
        route.full_clean()
        route.save()
    return route


def agent_named(*, instance: InstanceConfig, name: str) -> Agent | None:
    """A rule's `agent` as the API and the CLI name it: None for "default" (the
    instance's own agent); raises ValidationError for a name it does not have."""
    if name == DEFAULT_AGENT_NAME:
        return None
    agent = instance.agents.filter(name=name).first()
    if agent is None:
        raise ValidationError(
            {
                "agent": f"Instance '{instance.name}' has no agent named '{name}' ('default' "
                "is its own agent)."
            }
        )
    return agent
