"""The Automagik Agent API (the hub's original contract, unchanged).

POST {agent_api_url}/api/v1/agent/{default_agent}/run with header x-api-key;
the reply is `message`. The agent server keeps the conversation's memory
under `session_name`. Test connections: GET {agent_api_url}/health with the key.
"""

from typing import Any
from urllib.parse import quote

from instances.clients.agents.base import AgentCall, AgentCheck, AgentReply, HttpAgent, user_text

AGENT_MESSAGE_TYPES = frozenset({"text", "image", "audio", "video", "document"})
MESSAGE_LIMIT = 100


def build_agent_request(
    *, content: dict[str, Any], payload: dict[str, Any], session: str
) -> dict[str, Any]:
    """The JSON body for the agent, from a stored message's normalized content.

    A debounced burst's texts (`burst_texts`) go as one message, one per line.
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
        return build_agent_request(content=call.content, payload=call.payload, session=call.session)

    def stored(self, request: dict[str, Any]) -> dict[str, Any]:
        # The delivery is on the row already (payload).
        return {k: v for k, v in request.items() if k != "channel_payload"}

    def read(self, *, body: Any) -> AgentReply:
        return AgentReply(text=reply_text(body), body=body if isinstance(body, dict) else {})

    async def check(self, *, timeout: float) -> AgentCheck:
        # A GET on /health, never the run URL: that would run the agent. Any
        # answer but 401/403 means the server is there.
        url = f"{self.instance.agent_api_url.rstrip('/')}/health"
        answer = await self.probe(url, timeout=timeout)
        if isinstance(answer, AgentCheck):
            return answer
        return AgentCheck(
            True, "reachable", f"The agent server at {url} answers (HTTP {answer.status_code})."
        )
