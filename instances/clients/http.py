"""The process's one pooled HTTP client for outbound calls.

It holds no tenant state: every request gets its URL, key and timeout from
the instance row it is made for.
"""

import html
import json
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

import httpx
from django.conf import settings

from instances.clients.aiohttp_transport import (
    AiohttpTransport,
    DestinationRefused,
    OutboundRefused,
    ResponseTooLarge,
)

__all__ = [
    "DestinationRefused",
    "OutboundError",
    "OutboundRefused",
    "ResponseTooLarge",
    "describe_body",
    "new_http_client",
    "scrub_secrets",
]

USER_AGENT = "omnihub/0.1"
# What an operator sees of an answer (admin, API, CLI, the message log).
DETAIL_LIMIT = 200


class _NoCookies(httpx.Cookies):
    """A jar that keeps nothing: see CookielessClient."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class CookielessClient(httpx.AsyncClient):
    """An httpx client that neither keeps nor sends cookies.

    One client serves every tenant of the process: a cookie one tenant's agent
    or Evolution set (a load balancer's affinity cookie, say) must not go with
    another tenant's request to the same host. httpx has no switch for it, and
    its jar's bookkeeping (a urllib Request and an email Message built for every
    response) was a third of a call's CPU in the client: 94-103 against 63 µs
    per sendText through an httpx.MockTransport, two calls per answered message.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._cookies

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        self._cookies = _NoCookies()


def new_http_client(*, max_connections: int = 200) -> httpx.AsyncClient:
    return CookielessClient(
        transport=AiohttpTransport(
            max_connections=max_connections,
            allow_private=settings.OUTBOUND_ALLOW_PRIVATE,
            max_response_bytes=settings.OUTBOUND_MAX_RESPONSE_BYTES,
        ),
        # Every call passes its own timeout; this is the ceiling for any we forget.
        timeout=httpx.Timeout(30.0, connect=5.0),
        headers={"user-agent": USER_AGENT},
        follow_redirects=False,
    )


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """Upstream text may echo what we sent: each secret becomes [hidden]."""
    for secret in secrets:
        # A secret of a few characters would turn every message into [hidden] soup.
        if len(secret) >= 8:
            text = text.replace(secret, "[hidden]")
    return text


class OutboundError(Exception):
    """An outbound call failed. `retryable` says whether trying again is safe.

    `maybe_sent`: the request was written and no answer came back (a timeout, a
    dropped connection), so the server may have acted on it.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        maybe_sent: bool = False,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.maybe_sent = maybe_sent


def clean_text(text: str, *, limit: int = DETAIL_LIMIT) -> str:
    """One line of at most `limit` characters, no control or format characters.

    What an upstream answers is shown to operators (and logged): a terminal
    escape or a megabyte of text must not come with it.
    """
    text = "".join(" " if unicodedata.category(ch).startswith(("C", "Z")) else ch for ch in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


_HTML_START = re.compile(rb"\s*(?:<!doctype\s+html|<html|<head|<body|<title)", re.IGNORECASE)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


def _is_html(response: httpx.Response) -> bool:
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind in ("text/html", "application/xhtml+xml") or bool(
        _HTML_START.match(response.content[:512])
    )


def _json_message(body: Any) -> str:
    """The human part of a JSON error body: its message, detail or error."""
    if not isinstance(body, dict):
        return ""
    for key in ("message", "detail", "error", "error_description"):
        value = body.get(key)
        if isinstance(value, dict):
            value = _json_message(value)
        if isinstance(value, list):
            value = "; ".join(v if isinstance(v, str) else json.dumps(v) for v in value)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def describe_body(response: httpx.Response, limit: int = DETAIL_LIMIT) -> str:
    """An answer's body as an operator may see it: parsed, bounded, one line.

    An HTML page (a proxy's or a login page) becomes "an HTML page (<title>)";
    a JSON body its message when it has one; anything else its text, cleaned.
    """
    if not response.content.strip():
        return "(empty body)"
    if _is_html(response):
        found = _TITLE.search(response.content[:65536].decode("utf-8", "replace"))
        title = clean_text(html.unescape(found.group(1)), limit=limit - 16) if found else ""
        return f"an HTML page ({title})" if title else "an HTML page"
    try:
        message = _json_message(response.json())
    except ValueError:
        message = ""
    return clean_text(message or response.text, limit=limit)
