"""The process's one pooled HTTP client for outbound calls.

It holds no tenant state: every request gets its URL, key and timeout from
the instance row it is made for.
"""

import httpx

from webhooks.aiohttp_transport import AiohttpTransport

USER_AGENT = "omnihub/0.1"


def new_http_client(*, max_connections: int = 200) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=AiohttpTransport(max_connections=max_connections),
        # Every call passes its own timeout; this is the ceiling for any we forget.
        timeout=httpx.Timeout(30.0, connect=5.0),
        headers={"user-agent": USER_AGENT},
        follow_redirects=False,
    )


class OutboundError(Exception):
    """An outbound call failed. `retryable` says whether trying again is safe."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


def describe_body(response: httpx.Response, limit: int = 500) -> str:
    text = response.text
    return text if len(text) <= limit else text[:limit] + "..."
