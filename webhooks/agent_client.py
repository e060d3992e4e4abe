"""The agent call: the one place that knows the Agent API contract.

POST {agent_api_url}/api/v1/agent/{default_agent}/run with header x-api-key.
"""

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from instances.models import InstanceConfig
from webhooks.http import OutboundError, OutboundRefused, describe_body

AGENT_MESSAGE_TYPES = frozenset({"text", "image", "audio", "video", "document"})
RETRYABLE_STATUSES = frozenset({502, 503, 504})
SILENT_PREFIX = "AUTOMAGIK:"
MESSAGE_LIMIT = 100


@dataclass(frozen=True)
class AgentReply:
    text: str
    body: dict[str, Any]

    @property
    def should_send(self) -> bool:
        # Agents answer "AUTOMAGIK:..." for actions that must not reach the user.
        return bool(self.text.strip()) and not self.text.startswith(SILENT_PREFIX)


def session_name(*, instance: InstanceConfig, phone: str, chat_jid: str, epoch: int = 1) -> str:
    """The agent session of a chat: the first one keeps the single-tenant service's
    name (prefix + phone digits; a group's own digits), later ones add -2, -3, ..."""
    digits = chat_jid.split("@", 1)[0] if chat_jid.endswith("@g.us") else ""
    digits = digits or phone or chat_jid.split("@", 1)[0]
    name = f"{instance.session_prefix}{digits}"
    return name if epoch <= 1 else f"{name}-{epoch}"


def build_agent_request(
    *,
    instance: InstanceConfig,
    content: dict[str, Any],
    payload: dict[str, Any],
    session: str | None = None,
) -> dict[str, Any]:
    """The JSON body for the agent, from a stored message's normalized content.

    A debounced burst's texts (`burst_texts`) go as one message, one per line.
    """
    name = content.get("push_name") or "WhatsApp User"
    message_type = content.get("message_type", "text")
    phone = content.get("phone", "")
    chat_jid = content.get("chat_jid", "")
    texts = content.get("burst_texts")
    text = "\n".join(texts) if isinstance(texts, list) and texts else content.get("text", "")
    user_data: dict[str, Any] = {"name": name, "whatsapp_id": chat_jid, "source": "whatsapp"}
    if content.get("is_group"):
        user_data.update(
            is_group=True, group_jid=chat_jid, sender_jid=content.get("sender_jid", "")
        )
    body: dict[str, Any] = {
        "message_content": f"[{name}]: {text}",
        "message_type": message_type if message_type in AGENT_MESSAGE_TYPES else "text",
        "session_name": session or session_name(instance=instance, phone=phone, chat_jid=chat_jid),
        "user": {
            "phone_number": f"+{phone}" if phone else None,
            "email": None,
            "user_data": user_data,
        },
        "message_limit": MESSAGE_LIMIT,
        "channel_payload": payload,
        "preserve_system_prompt": False,
    }
    media = content.get("media")
    if media and body["message_type"] != "text":
        item: dict[str, Any] = {
            "mime_type": media.get("mime_type") or "application/octet-stream",
            "alt_text": media.get("caption") or media.get("file_name") or "",
        }
        base64 = _payload_base64(payload)
        if base64:
            item["data"] = base64
        else:
            item["media_url"] = media.get("url")
        body["media_contents"] = [item]
    return body


def _payload_base64(payload: dict[str, Any]) -> str | None:
    data = payload.get("data")
    message = data.get("message") if isinstance(data, dict) else None
    value = message.get("base64") if isinstance(message, dict) else None
    return value if isinstance(value, str) and value else None


def reply_text(body: Any) -> str:
    """The text to send: `message` as a string, or an object's `content`."""
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(message, dict):
        message = message.get("content")
    return message if isinstance(message, str) else ""


class AgentClient:
    def __init__(self, *, instance: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.url = (
            f"{instance.agent_api_url.rstrip('/')}/api/v1/agent/"
            f"{quote(instance.default_agent, safe='')}/run"
        )
        self.headers = {"x-api-key": instance.agent_api_key}
        self.timeout = httpx.Timeout(float(instance.agent_timeout), connect=5.0)
        self.deadline = float(instance.agent_timeout)
        self.http = http

    async def run(self, request: dict[str, Any]) -> AgentReply:
        try:
            # httpx's timeout is per read: an agent trickling its answer a byte at
            # a time would never hit it. The deadline bounds the whole call, so the
            # chat's lease (agent_timeout + EVOLUTION_TIMEOUT + margin) outlasts it.
            async with asyncio.timeout(self.deadline):
                response = await self.http.post(
                    self.url, json=request, headers=self.headers, timeout=self.timeout
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
            raise OutboundError(
                f"agent answered {response.status_code}: {describe_body(response)}",
                retryable=response.status_code in RETRYABLE_STATUSES,
                status=response.status_code,
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise OutboundError(
                f"agent answered non-JSON: {describe_body(response)}", retryable=False
            ) from exc
        return AgentReply(text=reply_text(body), body=body if isinstance(body, dict) else {})
