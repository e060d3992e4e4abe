"""OpenAI-compatible chat completions (OpenAI, Ollama, vLLM, LiteLLM, OpenRouter, Groq).

POST {agent_api_url}/chat/completions, `Authorization: Bearer {agent_api_key}`
(none when the key is blank, as a local Ollama wants), body
{"model": default_agent, "messages": [system, ...history, user]}; the reply is
choices[0].message.content. Such servers keep no memory: the hub sends the
session's last `history_limit` messages with each request
(webhooks/agent_history.py).
"""

from typing import Any

from instances.clients.agents.base import (
    AgentCall,
    AgentReply,
    Exchange,
    HttpAgent,
    bearer,
    user_text,
)


def user_message(content: dict[str, Any]) -> str:
    # In a group several people talk: the model must know who said what.
    text = user_text(content)
    if content.get("is_group"):
        return f"[{content.get('push_name') or 'WhatsApp User'}]: {text}"
    return text


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
        messages: list[dict[str, str]] = []
        if self.agent.system_prompt.strip():
            messages.append({"role": "system", "content": self.agent.system_prompt})
        messages += history_messages(call.history, limit=self.history_limit)
        messages.append({"role": "user", "content": user_message(call.content)})
        return {"model": self.agent.default_agent, "messages": messages}

    def read(self, *, body: Any) -> AgentReply:
        return AgentReply(text=reply_text(body), body=body if isinstance(body, dict) else {})
