"""A generic webhook: n8n, Make, Flowise, or any HTTP endpoint.

POST {agent_api_url} with the message as documented JSON (see build) and
`Authorization: Bearer {agent_api_key}` when a key is set. The reply is the
first of `reply`, `output`, `text`, `message`, `answer` that is a string (n8n's
"Respond to Webhook" answers `output`); an array of such objects or strings is
several messages, joined with blank lines into one reply that the worker cuts
there again (webhooks/reply_sending.py parts_of); empty, `null` or no such key
sends nothing.
The workflow keeps its own memory, under `session_id` if it wants one.

Test connections does not call it: a workflow runs on every request its URL
gets (an n8n or Make webhook trigger starts it whatever the body), so a test
would be a conversation. The step says so; a WhatsApp message is the test.
"""

from typing import Any

import httpx

from instances.clients.agents.base import (
    AgentCall,
    AgentCheck,
    AgentReply,
    HttpAgent,
    bearer,
    user_text,
)
from instances.clients.agents.media import AgentMedia, without_data

REPLY_KEYS = ("reply", "output", "text", "message", "answer")
NOT_CHECKED = (
    "A webhook agent cannot be checked without sending it a message (its workflow runs on "
    "every request), so the test does not call {url}. Send a WhatsApp message to the number: "
    "its row in the message log shows the workflow's answer or its error."
)


def text_of(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in REPLY_KEYS:
            value = item.get(key)
            if isinstance(value, str):
                return value
    return ""


def reply_text(body: Any) -> str:
    if isinstance(body, list):
        return "\n\n".join(t.strip() for t in map(text_of, body) if t.strip())
    return text_of(body)


def media_of(content: dict[str, Any], media: AgentMedia | None) -> dict[str, Any] | None:
    """The documented `media` object: the file as base64 when the hub has it (null
    when larger than media_max_bytes or not to be had; `note` says why)."""
    described = content.get("media")
    if media is None and not isinstance(described, dict):
        return None
    if media is None:
        keys = ("mime_type", "url", "file_name", "caption", "size")
        return {key: described.get(key) for key in keys} | {"base64": None, "note": ""}
    return {
        "mime_type": media.mime_type,
        "url": media.url,
        "file_name": media.file_name,
        "caption": media.caption,
        "size": media.size,
        "base64": media.base64,
        "note": media.note,
    }


def message_text(content: dict[str, Any]) -> str:
    # A voice note reaches the workflow as its transcript, marked as one.
    text = user_text(content)
    return f"[voice] {text}".strip() if content.get("message_type") == "audio" else text


class Webhook(HttpAgent):
    kind = "webhook"

    def url(self) -> str:
        return self.agent.agent_api_url

    def headers(self) -> dict[str, str]:
        return bearer(self.agent.agent_api_key)

    def build(self, *, call: AgentCall) -> dict[str, Any]:
        content = call.content
        is_group = bool(content.get("is_group"))
        chat_jid = content.get("chat_jid", "")
        return {
            "instance": self.instance.name,
            "message_id": content.get("message_id", ""),
            "chat_jid": chat_jid,
            "phone": content.get("phone", ""),
            "name": content.get("push_name", ""),
            "is_group": is_group,
            "group_jid": chat_jid if is_group else None,
            "sender_jid": content.get("sender_jid", ""),
            "message_type": content.get("message_type", "text"),
            "text": message_text(content),
            "media": media_of(content, call.media),
            "session_id": call.session,
            "conversation_id": call.conversation_id,
            "timestamp": content.get("timestamp"),
        }

    def stored(self, request: dict[str, Any]) -> dict[str, Any]:
        # The file is not kept on the row twice: its base64 becomes its length.
        media = request.get("media")
        if isinstance(media, dict) and media.get("base64"):
            return {**request, "media": without_data(media, key="base64")}
        return request

    def decode(self, response: httpx.Response) -> Any:
        # A workflow with nothing to say may answer 200 or 204 with no body.
        return None if not response.content.strip() else super().decode(response)

    def read(self, *, body: Any) -> AgentReply:
        return AgentReply(text=reply_text(body), body=body)

    async def check(self, *, timeout: float) -> AgentCheck:
        # ok: nothing failed, and an instance with a webhook agent must be able
        # to pass the test.
        return AgentCheck(True, "not_checked", NOT_CHECKED.format(url=self.agent.agent_api_url))
