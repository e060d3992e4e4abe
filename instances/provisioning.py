"""Setting a tenant up on its Evolution API: the one implementation behind admin and REST.

Every function answers a report; an Evolution or agent failure is a readable
message in it, never an exception.
"""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import unquote

import httpx
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist
from django.db.models import OuterRef, QuerySet, Subquery

from instances.clients.agents import agent_for
from instances.clients.evolution import (
    CREATE_TIMEOUT,
    PROVISION_TIMEOUT,
    EvolutionClient,
    EvolutionTarget,
)
from instances.clients.http import OutboundError, new_http_client, scrub_secrets
from instances.models import SECRET_FIELDS, TOKEN_HEADER, Agent, InstanceConfig
from instances.validators import EVENT_SLUGS

T = TypeVar("T")

TIMEOUT = PROVISION_TIMEOUT
# Read at call time, like TIMEOUT, so tests can shorten both.
CREATE_TIMEOUT_SECONDS = CREATE_TIMEOUT
KEY_REFUSED = (401, 403)
# MESSAGES_UPDATE: delivery and read receipts of what the hub sent (webhooks/outbox.py).
WEBHOOK_EVENTS = ("MESSAGES_UPSERT", "MESSAGES_UPDATE", "CONNECTION_UPDATE")
NOT_CONFIGURED = (
    "Provisioning needs an Evolution URL and key: this instance has none (the legacy "
    "default takes them from each delivery). Set both on the instance first."
)
NO_QR_YET = (
    "No QR code available yet — Evolution is still starting the session; this page keeps trying."
)
SCAN_QR = "Scan the QR code with WhatsApp on the phone: Settings > Linked devices > Link a device."
CONNECTED = "Connected"


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    # created, exists, set, unchanged, reachable, failed, not_configured...
    outcome: str
    message: str

    @property
    def label(self) -> str:
        return self.outcome.replace("_", " ").capitalize()


@dataclass(frozen=True)
class ConnectionReport:
    steps: list[Step]
    state: str | None = None

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def detail(self) -> str:
        failed = [step.message for step in self.steps if not step.ok]
        if failed:
            return " ".join(failed)
        # A webhook agent is not called by a test: say so rather than "answers".
        unchecked = [step.message for step in self.steps if step.outcome == "not_checked"]
        if unchecked:
            return " ".join(["Evolution answers.", *unchecked])
        return (
            "Evolution and the agent server both answer."
            if len(self.steps) <= 2
            else "Evolution and every agent answer."
        )


@dataclass(frozen=True)
class ProvisionReport:
    steps: list[Step]
    configured: bool = True

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def detail(self) -> str:
        return " ".join(step.message for step in self.steps if not step.ok) or " ".join(
            step.message for step in self.steps
        )


@dataclass(frozen=True)
class StateReport:
    ok: bool
    message: str
    state: str | None = None
    configured: bool = True

    @property
    def connected(self) -> bool:
        return self.state == "open"


@dataclass(frozen=True)
class QrReport:
    ok: bool
    message: str
    state: str | None = None
    qr_code: str | None = None
    pairing_code: str | None = None
    configured: bool = True

    @property
    def connected(self) -> bool:
        return self.state == "open"


def whatsapp_name(instance: InstanceConfig) -> str:
    return instance.whatsapp_instance or instance.name


def is_configured(instance: InstanceConfig) -> bool:
    return bool(instance.evolution_url and instance.evolution_key)


def desired_webhook(instance: InstanceConfig) -> dict[str, Any]:
    """The webhook config this hub needs on Evolution, as POST /webhook/set takes it."""
    return {
        "enabled": True,
        "url": instance.webhook_url,
        "headers": {TOKEN_HEADER: instance.webhook_token} if instance.webhook_token else {},
        "events": list(WEBHOOK_EVENTS),
        "byEvents": False,
        "base64": True,
    }


def webhook_matches(stored: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    """Whether GET /webhook/find's answer already is the config we would set."""
    if not stored:
        return False
    headers = stored.get("headers") or {}
    if not isinstance(headers, dict):
        return False
    return (
        stored.get("enabled") is True
        and stored.get("url") == desired["url"]
        # Header names are case-insensitive on the wire.
        and {k.lower(): v for k, v in headers.items()}
        == {k.lower(): v for k, v in desired["headers"].items()}
        and set(stored.get("events") or []) == set(desired["events"])
        and bool(stored.get("webhookByEvents")) is desired["byEvents"]
        and bool(stored.get("webhookBase64")) is desired["base64"]
    )


def scrub(text: str, instance: InstanceConfig) -> str:
    """Upstream text may echo what we sent; no secret of the instance leaves through it."""
    return scrub_secrets(text, (getattr(instance, field) for field in SECRET_FIELDS))


def _evolution(instance: InstanceConfig, http: httpx.AsyncClient) -> EvolutionClient:
    target = EvolutionTarget(
        base_url=instance.evolution_url,
        api_key=instance.evolution_key,
        instance_name=whatsapp_name(instance),
    )
    return EvolutionClient(target=target, http=http)


def _with_evolution(
    instance: InstanceConfig, operation: Callable[[EvolutionClient], Awaitable[T]]
) -> T:
    """Run one async operation against the instance's Evolution from sync code."""

    async def run() -> T:
        async with new_http_client(max_connections=4) as http:
            return await operation(_evolution(instance, http))

    return async_to_sync(run)()


def _missing_instance_hint(instance: InstanceConfig, error: OutboundError) -> str:
    message = scrub(str(error), instance)
    if error.status == 404:
        message += f'. Evolution has no instance "{whatsapp_name(instance)}": provision it first.'
    return message


def _wrong_key_message(instance: InstanceConfig, error: OutboundError) -> str:
    return (
        f"Evolution at {instance.evolution_url} refuses the instance's Evolution API key "
        f"(GET /instance/fetchInstances answered {error.status}): check the key."
    )


async def _explain(client: EvolutionClient, instance: InstanceConfig, error: OutboundError) -> str:
    """Why an instance's route failed, in words.

    Evolution answers 404 for a missing instance before it looks at the key:
    a wrong key would read "provision it first". A call that checks the key
    first (fetchInstances) tells the two apart.
    """
    if error.status == 404:
        try:
            await client.fetch_instance(timeout=TIMEOUT)
        except OutboundError as key_error:
            if key_error.status in KEY_REFUSED:
                return _wrong_key_message(instance, key_error)
    return _missing_instance_hint(instance, error)


class ExplainedError(OutboundError):
    """An OutboundError whose text is already the operator's explanation."""


async def _explained(
    client: EvolutionClient, instance: InstanceConfig, call: Callable[[], Awaitable[T]]
) -> T:
    try:
        return await call()
    except OutboundError as exc:
        raise ExplainedError(
            await _explain(client, instance, exc), retryable=exc.retryable, status=exc.status
        ) from exc


# --- connection test ---


async def _check_evolution(instance: InstanceConfig, http: httpx.AsyncClient) -> Step:
    if not is_configured(instance):
        return Step("Evolution API", False, "not_configured", NOT_CONFIGURED)
    client = _evolution(instance, http)
    try:
        state = await _explained(client, instance, lambda: client.connection_state(timeout=TIMEOUT))
    except OutboundError as exc:
        return Step("Evolution API", False, "failed", str(exc))
    return Step(
        "Evolution API",
        True,
        state,
        f"Evolution at {instance.evolution_url} answers; the WhatsApp session of "
        f'"{whatsapp_name(instance)}" is in state "{state}".',
    )


async def _check_agent(
    instance: InstanceConfig, http: httpx.AsyncClient, agent: Agent | None = None
) -> Step:
    # Each kind checks in its own way, never by running a conversation.
    check = await agent_for(instance=instance, http=http, agent=agent).check(timeout=TIMEOUT)
    name = "Agent server" if agent is None else f'Agent "{agent.name}"'
    return Step(name, check.ok, check.outcome, check.message)


def test_connections(*, instance: InstanceConfig) -> ConnectionReport:
    """Whether Evolution and the agent server answer, with this instance's URLs and keys."""

    # The routing's agents too (instances/models.py Agent), each its own step.
    routed = list(instance.agents.order_by("name")) if instance.pk else []

    async def run() -> list[Step]:
        async with new_http_client(max_connections=4) as http:
            return list(
                await asyncio.gather(
                    _check_evolution(instance, http),
                    _check_agent(instance, http),
                    *(_check_agent(instance, http, agent) for agent in routed),
                )
            )

    steps = async_to_sync(run)()
    evolution = steps[0]
    state = evolution.outcome if evolution.ok else None
    return ConnectionReport(steps=steps, state=state)


# Not a test function, whatever pytest's collector may think of the name.
test_connections.__test__ = False  # type: ignore[attr-defined]


# --- provisioning ---


def webhook_owner(url: object, *, tenants: dict[str, bool], base: str, own: str) -> str | None:
    """The other tenant of this hub a stored webhook URL delivers to, if any.

    `tenants` maps every tenant's name to whether it is the default (the
    legacy route /webhook/evolution[/<event>] delivers to it).
    """
    prefix = f"{base}/webhook/evolution"
    if not isinstance(url, str) or not (
        url == prefix or url.startswith((f"{prefix}/", f"{prefix}?"))
    ):
        return None
    path = url[len(prefix) :].split("?", 1)[0].strip("/")
    segment = unquote(path.split("/")[0])
    if not segment or segment.lower() in EVENT_SLUGS:
        owner = next((name for name, default in tenants.items() if default), None)
    else:
        owner = segment if segment in tenants else None
    return owner if owner != own else None


async def _existing(client: EvolutionClient, instance: InstanceConfig) -> tuple[Step | None, bool]:
    """(a failed step, or None; whether the Evolution instance exists), key checked first."""
    try:
        return None, await client.fetch_instance(timeout=TIMEOUT) is not None
    except OutboundError as exc:
        if exc.status in KEY_REFUSED:
            return Step(
                "Evolution instance", False, "bad_key", _wrong_key_message(instance, exc)
            ), False
        return Step("Evolution instance", False, "failed", scrub(str(exc), instance)), False


async def _instance_step(
    client: EvolutionClient, instance: InstanceConfig, desired: dict[str, Any]
) -> Step:
    name = whatsapp_name(instance)
    failed, exists = await _existing(client, instance)
    if failed is not None:
        return failed
    if exists:
        return Step(
            "Evolution instance",
            True,
            "exists",
            f'Instance "{name}" already exists on Evolution; left as it is.',
        )
    webhook = {key: desired[key] for key in ("url", "headers", "events", "byEvents", "base64")}
    try:
        created = await client.create_instance(webhook=webhook, timeout=CREATE_TIMEOUT_SECONDS)
    except OutboundError as exc:
        if exc.status is not None:
            return Step("Evolution instance", False, "failed", scrub(str(exc), instance))
        # No answer (a timeout, a dropped connection): Evolution may have
        # created it all the same. Look, and carry on if it did.
        _, exists = await _existing(client, instance)
        if not exists:
            return Step(
                "Evolution instance",
                False,
                "failed",
                f"{scrub(str(exc), instance)}. Provision again: it completes what this run left.",
            )
        return Step(
            "Evolution instance",
            True,
            "created",
            f'Created instance "{name}" on Evolution (its answer did not arrive in time).',
        )
    if not created:
        return Step(
            "Evolution instance",
            True,
            "exists",
            f'Instance "{name}" already exists on Evolution; left as it is.',
        )
    return Step("Evolution instance", True, "created", f'Created instance "{name}" on Evolution.')


async def _provision_steps(
    client: EvolutionClient,
    instance: InstanceConfig,
    *,
    tenants: dict[str, bool],
    force: bool,
) -> list[Step]:
    desired = desired_webhook(instance)
    first = await _instance_step(client, instance, desired)
    steps = [first]
    if not first.ok:
        return steps

    described = f"{desired['url']}, events {', '.join(WEBHOOK_EVENTS)}, " + (
        f"with the {TOKEN_HEADER} header" if desired["headers"] else "without a token header"
    )
    try:
        stored = await client.find_webhook(timeout=TIMEOUT)
    except OutboundError:
        # Setting it anyway is harmless; a real problem shows in the set call.
        stored = None
    if webhook_matches(stored, desired):
        # Created this run: Evolution stored the webhook given with the create.
        outcome = "set" if first.outcome == "created" else "unchanged"
        verb = "Webhook set" if outcome == "set" else "Webhook already set"
        steps.append(Step("Webhook", True, outcome, f"{verb}: {described}."))
        return steps
    owner = webhook_owner(
        (stored or {}).get("url"), tenants=tenants, base=settings.PUBLIC_BASE_URL, own=instance.name
    )
    if owner is not None and not force:
        steps.append(
            Step(
                "Webhook",
                False,
                "claimed",
                f'The Evolution instance "{whatsapp_name(instance)}" delivers to this hub\'s '
                f'tenant "{owner}" ({stored["url"]}); pointing it here would take that '
                "tenant's messages. Left as it is: provision with force to move it.",
            )
        )
        return steps
    try:
        await client.set_webhook(webhook=desired, timeout=TIMEOUT)
    except OutboundError as exc:
        steps.append(Step("Webhook", False, "failed", scrub(str(exc), instance)))
        return steps
    taken = f" (taken over from tenant {owner})" if owner is not None else ""
    steps.append(Step("Webhook", True, "set", f"Webhook set{taken}: {described}."))
    return steps


def provision(*, instance: InstanceConfig, force: bool = False) -> ProvisionReport:
    """Make sure the Evolution instance exists, then point its webhook at this hub.

    The key is checked first (fetchInstances), the instance is created with
    its webhook, and a create whose answer is lost is looked up again: running
    it again completes what a run left, and changes nothing once Evolution
    holds the right config. A webhook that delivers to another tenant of this
    hub is left alone unless `force`.
    """
    if not is_configured(instance):
        return ProvisionReport(
            steps=[Step("Evolution instance", False, "not_configured", NOT_CONFIGURED)],
            configured=False,
        )
    tenants = dict(InstanceConfig.objects.values_list("name", "is_default"))
    return ProvisionReport(
        steps=_with_evolution(
            instance,
            lambda client: _provision_steps(client, instance, tenants=tenants, force=force),
        )
    )


def needs_force(report: ProvisionReport) -> bool:
    """Whether the report refused to take another tenant's webhook."""
    return any(step.outcome == "claimed" for step in report.steps)


# --- state and QR code ---


def connection_state(*, instance: InstanceConfig) -> StateReport:
    """The live state of the WhatsApp session, as Evolution tells it now."""
    if not is_configured(instance):
        return StateReport(ok=False, message=NOT_CONFIGURED, configured=False)
    try:
        state = _with_evolution(
            instance,
            lambda client: _explained(
                client, instance, lambda: client.connection_state(timeout=TIMEOUT)
            ),
        )
    except ExplainedError as exc:
        return StateReport(ok=False, message=str(exc))
    return StateReport(ok=True, message=f'The WhatsApp session is in state "{state}".', state=state)


def qr_data_url(value: Any) -> str | None:
    """Evolution's base64 PNG as a data URL an <img> can show; anything else is dropped."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("data:image/"):
        return value
    if value.startswith("data:") or ":" in value[:12]:
        return None
    return f"data:image/png;base64,{value}"


async def _qr(client: EvolutionClient, instance: InstanceConfig) -> tuple[str, dict[str, Any]]:
    state = await _explained(client, instance, lambda: client.connection_state(timeout=TIMEOUT))
    if state == "open":
        return state, {}
    # Connect starts a session when there is none; while one is starting it
    # answers the current QR code, or {"count": 0} before the first.
    return state, await client.connect(timeout=TIMEOUT)


def fetch_qr(*, instance: InstanceConfig) -> QrReport:
    """The QR code (and pairing code) that links a phone to the instance, when there is one."""
    if not is_configured(instance):
        return QrReport(ok=False, message=NOT_CONFIGURED, configured=False)
    try:
        state, body = _with_evolution(instance, lambda client: _qr(client, instance))
    except ExplainedError as exc:
        return QrReport(ok=False, message=str(exc))
    except OutboundError as exc:
        return QrReport(ok=False, message=_missing_instance_hint(instance, exc))
    connect_instance = body.get("instance")
    if isinstance(connect_instance, dict) and connect_instance.get("state") == "open":
        state = "open"
    if state == "open":
        return QrReport(ok=True, message=CONNECTED, state=state)
    image = qr_data_url(body.get("base64"))
    pairing = body.get("pairingCode")
    pairing_code = pairing if isinstance(pairing, str) and pairing else None
    if image is None and pairing_code is None:
        return QrReport(ok=True, message=NO_QR_YET, state=state)
    return QrReport(ok=True, message=SCAN_QR, state=state, qr_code=image, pairing_code=pairing_code)


# --- what the hub itself saw ---


# The pipeline's rows are read through the reverse relations its models declare
# (messages, connection): instances never imports webhooks.
def _messages() -> QuerySet[Any]:
    return InstanceConfig._meta.get_field("messages").related_model._default_manager.all()


def with_activity(queryset: QuerySet[InstanceConfig]) -> QuerySet[InstanceConfig]:
    """Each instance with its last connection.update and last_message_at, in one query."""
    last = (
        _messages()
        .filter(instance=OuterRef("pk"))
        .order_by("-received_at")
        .values("received_at")[:1]
    )
    return queryset.select_related("connection").annotate(last_message_at=Subquery(last))


def stored_connection(instance: InstanceConfig) -> Any | None:
    """The last connection.update Evolution delivered for this instance, if any
    (a webhooks.ConnectionState)."""
    try:
        return instance.connection  # type: ignore[attr-defined]
    except ObjectDoesNotExist:
        return None


def last_message_at(instance: InstanceConfig) -> datetime | None:
    if hasattr(instance, "last_message_at"):
        return instance.last_message_at  # type: ignore[no-any-return]
    return (
        _messages()
        .filter(instance=instance)
        .order_by("-received_at")
        .values_list("received_at", flat=True)
        .first()
    )
