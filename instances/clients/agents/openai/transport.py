"""OpenAI-compatible chat completions (OpenAI, Ollama, vLLM, LiteLLM, OpenRouter, Groq).

POST {agent_api_url}/chat/completions, `Authorization: Bearer {agent_api_key}`
(none when the key is blank, as a local Ollama wants), body
{"model": default_agent, "messages": [system, ...history, user]}; the reply is
choices[0].message.content. Such servers keep no memory: the hub sends the
session's last `history_limit` messages with each request
(webhooks/agent_history.py).

Test connections: GET {agent_api_url}/models with the same Bearer header, and
the model (default_agent) must be in its `data` list, as OpenAI, Ollama, vLLM,
LiteLLM, OpenRouter and Groq list theirs: a model the server does not have
would fail every message.
"""

from typing import Any

from instances.clients.agents.base import (
    AgentCall,
    AgentCheck,
    AgentReply,
    Exchange,
    HttpAgent,
    bearer,
    user_text,
)
from instances.clients.agents.media import MEDIA_KINDS, AgentMedia, without_data
from instances.clients.http import describe_body

# How many of the server's models a "not listed" message names.
LISTED = 10


def user_message(content: dict[str, Any]) -> str:
    """A user's turn as text (also in the history): a voice note's transcript as
    "[voice] …", other media marked by their type before the caption."""
    text = user_text(content)
    kind = content.get("message_type", "text")
    if kind == "audio":
        text = f"[voice] {text}".strip()
    elif kind in MEDIA_KINDS:
        text = f"[{kind}] {text}".strip()
    # In a group several people talk: the model must know who said what.
    if content.get("is_group"):
        return f"[{content.get('push_name') or 'WhatsApp User'}]: {text}"
    return text


def user_content(content: dict[str, Any], media: AgentMedia | None) -> str | list[dict[str, Any]]:
    """The new user message: an image as an image_url part (a data: URL) with its
    caption as text; a document's text after its caption; other media (video,
    files too large or not had) as a description."""
    text = user_message(content)
    if media is None or media.kind == "audio":
        return text
    if media.kind == "image" and media.data_url is not None:
        return [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": media.data_url}},
        ]
    if media.kind == "document" and media.text:
        return f"{text}\n\n{media.file_name or 'document'}:\n{media.text}"
    prefix = f"[{content.get('push_name') or 'WhatsApp User'}]: " if content.get("is_group") else ""
    return prefix + media.description()


def history_messages(history: tuple[Exchange, ...], *, limit: int) -> list[dict[str, str]]:
    """The last `limit` messages of the earlier exchanges, user and assistant
    together, oldest dropped first."""
    messages: list[dict[str, str]] = []
    for exchange in history:
        messages.append({"role": "user", "content": user_message(exchange.content)})
        if exchange.reply:
            messages.append({"role": "assistant", "content": exchange.reply})
    return messages[-limit:] if limit > 0 else []


def reply_text(body: Any) -> str:
    choices = body.get("choices") if isinstance(body, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def model_ids(body: Any) -> list[str] | None:
    """The ids in a GET /models answer ({"data": [{"id": ...}, ...]}), None when
    the answer is not such a list."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return [
        item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)
    ]


def lists_model(ids: list[str], model: str) -> bool:
    # Ollama lists "llama3.2:latest" and answers to "llama3.2".
    return model in ids or (":" not in model and f"{model}:latest" in ids)


def named(ids: list[str]) -> str:
    shown = ", ".join(f'"{i}"' for i in ids[:LISTED])
    return shown + (f" and {len(ids) - LISTED} more" if len(ids) > LISTED else "")


class OpenAI(HttpAgent):
    kind = "openai"

    @property
    def history_limit(self) -> int:
        return self.agent.history_limit

    def url(self) -> str:
        return f"{self.agent.agent_api_url.rstrip('/')}/chat/completions"

    def headers(self) -> dict[str, str]:
        return bearer(self.agent.agent_api_key)

    def build(self, *, call: AgentCall) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if self.agent.system_prompt.strip():
            messages.append({"role": "system", "content": self.agent.system_prompt})
        messages += history_messages(call.history, limit=self.history_limit)
        messages.append({"role": "user", "content": user_content(call.content, call.media)})
        return {"model": self.agent.default_agent, "messages": messages}

    def stored(self, request: dict[str, Any]) -> dict[str, Any]:
        # An image's data: URL is the file itself: the row keeps its length.
        last = request["messages"][-1]
        if not isinstance(last["content"], list):
            return request
        parts = [
            {**part, "image_url": without_data(part["image_url"], key="url")}
            if part.get("type") == "image_url"
            else part
            for part in last["content"]
        ]
        return {**request, "messages": [*request["messages"][:-1], {**last, "content": parts}]}

    def read(self, *, body: Any) -> AgentReply:
        return AgentReply(text=reply_text(body), body=body if isinstance(body, dict) else {})

    async def check(self, *, timeout: float) -> AgentCheck:
        url = f"{self.agent.agent_api_url.rstrip('/')}/models"
        answer = await self.probe(url, timeout=timeout)
        if isinstance(answer, AgentCheck):
            return answer
        model = self.agent.default_agent
        status = answer.status_code
        if status >= 300:
            message = f"The agent server at {url} answered {status}: {describe_body(answer)}."
            if status == 404:
                message += (
                    " The agent API URL must be the API base, e.g. https://api.openai.com/v1 "
                    "or http://127.0.0.1:11434/v1 for Ollama."
                )
            return AgentCheck(False, "failed", self.scrub(message))
        try:
            ids = model_ids(answer.json())
        except ValueError:
            ids = None
        if ids is None:
            return AgentCheck(
                True,
                "reachable",
                f"The agent server at {url} answers (HTTP {status}), but not with a model "
                f'list: the model "{model}" is not checked.',
            )
        if not lists_model(ids, model):
            lists = f"it lists {named(ids)}" if ids else "it lists none"
            return AgentCheck(
                False,
                "no_model",
                self.scrub(
                    f'The agent server at {url} answers, but does not have the model "{model}" '
                    f"(the instance's default agent); {lists}. Every message would fail: set "
                    "one it lists, or install it (Ollama: ollama pull)."
                ),
            )
        return AgentCheck(
            True, "reachable", f'The agent server at {url} answers and lists the model "{model}".'
        )
