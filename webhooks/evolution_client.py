"""Calls to one Evolution API instance: the one place that sends replies."""

import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from django.conf import settings

from webhooks.http import OutboundError, describe_body


@dataclass(frozen=True)
class EvolutionTarget:
    """Where a reply goes: base URL, key and the instance name inside Evolution."""

    base_url: str
    api_key: str
    instance_name: str


class EvolutionClient:
    def __init__(self, *, target: EvolutionTarget, http: httpx.AsyncClient) -> None:
        self.base_url = target.base_url.rstrip("/")
        self.instance_path = quote(target.instance_name, safe="")
        self.headers = {"apikey": target.api_key}
        self.http = http

    def _url(self, route: str) -> str:
        return f"{self.base_url}/{route}/{self.instance_path}"

    async def _post(self, route: str, body: dict[str, Any], timeout: float) -> httpx.Response:
        return await self.http.post(
            self._url(route), json=body, headers=self.headers, timeout=timeout
        )

    async def send_text(self, *, number: str, text: str) -> dict[str, Any]:
        """POST /message/sendText/{instance}; raises OutboundError."""
        try:
            response = await self._post(
                "message/sendText", {"number": number, "text": text}, settings.EVOLUTION_TIMEOUT
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached Evolution: trying again cannot send twice.
            raise OutboundError(f"Evolution unreachable: {exc!r}", retryable=True) from exc
        except httpx.TimeoutException as exc:
            # Evolution may have sent the text; a retry could answer twice.
            raise OutboundError(
                f"Evolution did not answer in {settings.EVOLUTION_TIMEOUT:g}s; "
                "not retried, the reply may have been sent",
                retryable=False,
            ) from exc
        except httpx.TransportError as exc:
            raise OutboundError(f"Evolution connection failed: {exc!r}", retryable=True) from exc
        if response.status_code >= 300:
            raise OutboundError(
                f"Evolution answered {response.status_code}: {describe_body(response)}",
                retryable=response.status_code >= 500,
                status=response.status_code,
            )
        try:
            body = response.json()
        except ValueError:
            body = {}
        return body if isinstance(body, dict) else {}

    async def send_presence(self, *, number: str, delay_ms: int = 5000) -> None:
        """Show "typing..." while the agent works; a failure here changes nothing."""
        with contextlib.suppress(httpx.HTTPError):
            await self._post(
                "chat/sendPresence",
                {"number": number, "presence": "composing", "delay": delay_ms},
                # Evolution holds the request open for `delay` before answering.
                delay_ms / 1000 + 5.0,
            )
