"""The Automagik Agent API (the hub's original contract, unchanged).

POST {agent_api_url}/api/v1/agent/{default_agent}/run with header x-api-key;
the reply is `message`. The agent server keeps the conversation's memory
under `session_name`. Test connections: GET {agent_api_url}/health with the key.
"""

import base64
from typing import Any
from urllib.parse import quote

from instances.clients.agents.base import AgentCall, AgentCheck, AgentReply, HttpAgent, user_text
from instances.clients.agents.media import AgentMedia, delivered_base64, without_data

AGENT_MESSAGE_TYPES = frozenset({"text", "image", "audio", "video", "document"})
MESSAGE_LIMIT = 100


def build_agent_request(
    *,
    content: dict[str, Any],
    payload: dict[str, Any],
    session: str,
    media: AgentMedia | None = None,
) -> dict[str, Any]:
    """The JSON body for the agent, from a stored message's normalized content.

    A debounced burst's texts (`burst_texts`) go as one message, one per line. A
    voice note's transcript is its text, with message_type `audio`; the file
    goes as `media_contents` (base64 when the hub has it, else Evolution's
    readable URL, else a description as alt_text).
    """
    name = content.get("push_name") or "WhatsApp User"
    message_type = content.get("message_type", "text")
    phone = content.get("phone", "")
    chat_jid = content.get("chat_jid", "")
    user_data: dict[str, Any] = {"name": name, "whatsapp_id": chat_jid, "source": "whatsapp"}
    if content.get("is_group"):
        user_data.update(
            is_group=True, group_jid=chat_jid, sender_jid=content.get("sender_jid", "")
        )
    body: dict[str, Any] = {
        "message_content": f"[{name}]: {user_text(content)}",
        "message_type": message_type if message_type in AGENT_MESSAGE_TYPES else "text",
        "session_name": session,
        "user": {
            "phone_number": f"+{phone}" if phone else None,
            "email": None,
            "user_data": user_data,
        },
        "message_limit": MESSAGE_LIMIT,
        "channel_payload": payload,
        "preserve_system_prompt": False,
    }
    if body["message_type"] == "text":
        return body
    if media is None and isinstance(content.get("media"), dict):
        # Built without the worker's preparation (as the README's example is):
        # the delivery's own base64, else its URL.
        described = content["media"]
        encoded = delivered_base64(payload)
        media = AgentMedia(
            kind=message_type,
            mime_type=described.get("mime_type") or "",
            file_name=described.get("file_name") or "",
            caption=described.get("caption") or "",
            data=base64.b64decode(encoded) if encoded else None,
            url=described.get("url"),
        )
    if media is not None:
        body["media_contents"] = [media_item(media)]
    return body


def media_item(media: AgentMedia) -> dict[str, Any]:
    """One entry of the Agent API's media_contents."""
    item: dict[str, Any] = {
        "mime_type": media.mime_type or "application/octet-stream",
        "alt_text": media.caption or media.file_name or "",
    }
    if media.data is not None:
        item["data"] = media.base64
    elif media.url:
        item["media_url"] = media.url
    else:
        # Nothing the agent could open: what it is, and why it is missing.
        item["alt_text"] = media.description()
    return item


def reply_text(body: Any) -> str:
    """The text to send: `message` as a string, or an object's `content`."""
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(message, dict):
        message = message.get("content")
    return message if isinstance(message, str) else ""


class Automagik(HttpAgent):
    kind = "automagik"

    def url(self) -> str:
        return (
            f"{self.agent.agent_api_url.rstrip('/')}/api/v1/agent/"
            f"{quote(self.agent.default_agent, safe='')}/run"
        )

    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.agent.agent_api_key}

    def build(self, *, call: AgentCall) -> dict[str, Any]:
        return build_agent_request(
            content=call.content, payload=call.payload, session=call.session, media=call.media
        )

    def stored(self, request: dict[str, Any]) -> dict[str, Any]:
        # The delivery is on the row already (payload); a file is not kept twice.
        kept = {k: v for k, v in request.items() if k != "channel_payload"}
        if "media_contents" in kept:
            kept["media_contents"] = [without_data(item) for item in kept["media_contents"]]
        return kept

    def read(self, *, body: Any) -> AgentReply:
        return AgentReply(text=reply_text(body), body=body if isinstance(body, dict) else {})

    async def check(self, *, timeout: float) -> AgentCheck:
        # A GET on /health, never the run URL: that would run the agent. Any
        # answer but 401/403 means the server is there.
        url = f"{self.agent.agent_api_url.rstrip('/')}/health"
        answer = await self.probe(url, timeout=timeout)
        if isinstance(answer, AgentCheck):
            return answer
        return AgentCheck(
            True, "reachable", f"The agent server at {url} answers (HTTP {answer.status_code})."
        )
