"""What every agent kind shares: what the worker hands it, what it answers, and
the one HTTP call with the hub's failure rules.

A kind (instances/clients/agents/<kind>/transport.py) only says where the request goes,
with which headers and body, and how its answer reads; the retry rules are
here so that no kind can get them wrong.
"""

import asyncio
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import httpx

from instances.clients.agents.media import AgentMedia
from instances.clients.evolution import transport_reason
from instances.clients.http import (
    OutboundError,
    OutboundRefused,
    ResponseTooLarge,
    describe_body,
    scrub_secrets,
)
from instances.models import SECRET_FIELDS, InstanceConfig

RETRYABLE_STATUSES = frozenset({502, 503, 504})
SILENT_PREFIX = "AUTOMAGIK:"
KEY_REFUSED = (401, 403)


@dataclass(frozen=True)
class AgentReply:
    text: str
    # The agent's answer as parsed JSON, kept on the row (agent_response).
    body: Any

    @property
    def should_send(self) -> bool:
        # Agents answer "AUTOMAGIK:..." for actions that must not reach the user.
        return bool(self.text.strip()) and not self.text.startswith(SILENT_PREFIX)


@dataclass(frozen=True)
class AgentCheck:
    """What "Test connections" found, without running the agent: `outcome` is
    reachable, bad_key, failed, no_model, not_checked..."""

    ok: bool
    outcome: str
    message: str


@dataclass(frozen=True)
class Exchange:
    """One earlier turn of the session: what the user wrote (the row's normalized
    content) and what was sent back ("" when nothing the agent wrote was sent)."""

    content: dict[str, Any]
    reply: str


@dataclass(frozen=True)
class AgentCall:
    """The message to answer, as the worker knows it."""

    content: dict[str, Any]
    payload: dict[str, Any]
    session: str
    conversation_id: int | None = None
    # Oldest first; only for kinds whose history_limit is not 0.
    history: tuple[Exchange, ...] = field(default=())
    # The message's media as the worker prepared it (webhooks/media_input.py).
    media: AgentMedia | None = None


class AgentSettings(Protocol):
    """Where and how an agent is called: the instance's own agent fields (its
    default agent), or an agent row of its routing (instances.models.Agent)."""

    agent_kind: str
    agent_api_url: str
    agent_api_key: str
    default_agent: str
    system_prompt: str
    agent_timeout: int
    history_limit: int


def session_name(
    *, instance: InstanceConfig, phone: str, chat_jid: str, epoch: int = 1, agent: str = ""
) -> str:
    """The agent session of a chat: the first one keeps the single-tenant service's
    name (prefix + phone digits; a group's own digits), later ones add -2, -3, ...

    A routed agent's sessions add -<its name> (a name starts with a letter, so it
    never reads as an epoch): each agent keeps its own memory of the chat.
    """
    digits = chat_jid.split("@", 1)[0] if chat_jid.endswith("@g.us") else ""
    digits = digits or phone or chat_jid.split("@", 1)[0]
    name = f"{instance.session_prefix}{digits}"
    name = name if epoch <= 1 else f"{name}-{epoch}"
    return f"{name}-{agent}" if agent else name


def user_text(content: dict[str, Any]) -> str:
    """The user's turn: a debounced burst's texts (`burst_texts`) one per line."""
    texts = content.get("burst_texts")
    return "\n".join(texts) if isinstance(texts, list) and texts else content.get("text", "")


class HttpAgent:
    """One agent kind. Subclasses set `kind` and define url, headers, build and read."""

    kind: ClassVar[str]

    def __init__(
        self,
        *,
        instance: InstanceConfig,
        http: httpx.AsyncClient,
        agent: AgentSettings | None = None,
    ) -> None:
        # The tenant (its name, its sessions) and the agent called: the
        # instance's own unless routing chose another.
        self.instance = instance
        self.agent: AgentSettings = agent if agent is not None else instance
        self.http = http
        self.timeout = httpx.Timeout(float(self.agent.agent_timeout), connect=5.0)
        self.deadline = float(self.agent.agent_timeout)

    @property
    def history_limit(self) -> int:
        """How many earlier messages of the session the worker must load (0: none:
        the agent keeps its own memory)."""
        return 0

    def url(self) -> str:
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def build(self, *, call: AgentCall) -> dict[str, Any]:
        """The JSON body of the request."""
        raise NotImplementedError

    def stored(self, request: dict[str, Any]) -> dict[str, Any]:
        """What of the request is kept on the row (agent_request)."""
        return request

    def read(self, *, body: Any) -> AgentReply:
        """The reply in a 2xx answer's parsed JSON."""
        raise NotImplementedError

    def decode(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise OutboundError(
                f"agent answered non-JSON: {describe_body(response)}", retryable=False
            ) from exc

    async def check(self, *, timeout: float) -> AgentCheck:
        """Whether the agent answers with this instance's URL and key, without
        running a conversation (each kind says how; see its transport.py)."""
        raise NotImplementedError

    def scrub(self, text: str) -> str:
        """Upstream text may echo what we sent; no secret of the instance leaves through it."""
        secrets = [getattr(self.instance, name) for name in SECRET_FIELDS]
        # A routed agent's own key too.
        secrets.append(self.agent.agent_api_key)
        return scrub_secrets(text, secrets)

    async def probe(self, url: str, *, timeout: float) -> httpx.Response | AgentCheck:
        """GET `url` with the kind's headers: the answer, or the failed check in
        words (no answer in time, unreachable, the key refused)."""
        try:
            response = await self.http.get(url, headers=self.headers(), timeout=timeout)
        except httpx.TimeoutException:
            message = f"The agent server at {url} did not answer within {timeout:g} s."
            return AgentCheck(False, "failed", message)
        except ResponseTooLarge as exc:
            # It answers; the hub only refuses to read that much.
            reason = self.scrub(str(exc))
            message = (
                f"The agent server at {url} answers, but more than the hub reads ({reason}): "
                "its answer is not checked."
            )
            return AgentCheck(True, "reachable", message)
        except httpx.TransportError as exc:
            reason = self.scrub(transport_reason(exc))
            return AgentCheck(
                False, "failed", f"Could not reach the agent server at {url}: {reason}"
            )
        if response.status_code in KEY_REFUSED:
            return AgentCheck(
                False,
                "bad_key",
                f"The agent server at {url} answered {response.status_code}: it refuses the "
                "instance's agent API key.",
            )
        return response

    async def run(self, *, request: dict[str, Any]) -> AgentReply:
        try:
            # httpx's timeout is per read: an agent trickling its answer a byte at
            # a time would never hit it. The deadline bounds the whole call, so the
            # chat's lease (agent_timeout + EVOLUTION_TIMEOUT + margin) outlasts it.
            async with asyncio.timeout(self.deadline):
                response = await self.http.post(
                    self.url(), json=request, headers=self.headers(), timeout=self.timeout
                )
        except TimeoutError as exc:
            raise OutboundError(
                f"agent timed out: no complete answer within {self.deadline:g}s; not "
                "retried (it may have acted)",
                retryable=False,
            ) from exc
        except OutboundRefused as exc:
            # Refused by the hub: the address is forbidden (nothing was sent), or
            # the agent answered too much (it acted): no retry either way.
            raise OutboundError(f"agent call refused: {exc}", retryable=False) from exc
        except httpx.TimeoutException as exc:
            # Once the request is sent the agent may have acted: calling it again
            # could act twice. Connect and pool timeouts never reached it.
            retryable = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            raise OutboundError(
                f"agent timed out ({type(exc).__name__})", retryable=retryable
            ) from exc
        except httpx.TransportError as exc:
            raise OutboundError(f"agent unreachable: {exc!r}", retryable=True) from exc
        if response.status_code >= 300:
            # The body's message is kept (e.g. an OpenAI 401's "Incorrect API key").
            raise OutboundError(
                f"agent answered {response.status_code}: {describe_body(response)}",
                retryable=response.status_code in RETRYABLE_STATUSES,
                status=response.status_code,
            )
        return self.read(body=self.decode(response))


def bearer(key: str) -> dict[str, str]:
    """Authorization for the kinds that use a bearer token: none when the key is blank."""
    return {"authorization": f"Bearer {key}"} if key else {}
