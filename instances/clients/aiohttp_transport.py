"""An httpx transport that sends through aiohttp's connection pool.

Every message makes two or three outbound calls (agent, sendText, and typing
presence when the agent is slow). Measured on the 2-core bench machine,
httpx's own transport (httpcore over anyio) spent about 1.1 ms of CPU per
call; aiohttp, whose HTTP parser is C, 0.11 ms; httpx's client over this
transport 0.33 ms. The hub keeps httpx's API
(and tests keep `httpx.MockTransport`) and gets most of aiohttp's speed.

aiohttp's errors are turned into httpx's by what happened, because the
callers decide on them whether a retry can act twice: nothing sent (connect
error or timeout, pool timeout) versus a request that may have arrived (read
timeout, dropped connection).
"""

import ipaddress
import socket
import ssl
import urllib.request
from functools import cache
from urllib.parse import urlsplit

import aiohttp
import certifi
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from instances.validators import address_refusal, literal_address

# aiohttp decodes these as it reads (auto_decompress), so the size cap counts
# the decoded bytes: a small gzip bomb cannot expand past it.
ACCEPT_ENCODING = "gzip, deflate"
_DECODED_RAW = frozenset({b"content-encoding", b"content-length"})


class OutboundRefused(httpx.TransportError):
    """The hub refused to finish a call: the request never ran (or its answer was
    not read). Callers must not take it for "unreachable, try again"."""


class DestinationRefused(OutboundRefused):
    """The URL's host is, or resolves to, an address the hub must not call."""


# The request extension that raises the answer's size cap for one call.
MAX_RESPONSE_BYTES = "omnihub_max_response_bytes"


class ResponseTooLarge(OutboundRefused):
    """The answer holds more than the transport's max_response_bytes."""


class _Refused(Exception):
    # Raised inside aiohttp's resolver, which knows no request; it becomes a
    # DestinationRefused carrying the request in handle_async_request.
    pass


class CheckedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the hub may connect to.

    aiohttp connects to exactly what this returns (and caches it), so a name
    that resolves to a metadata or, with OUTBOUND_ALLOW_PRIVATE off, a private
    address is refused at connect time, whatever the URL looked like when saved.
    """

    def __init__(self, *, allow_private: bool, exempt: frozenset[str]) -> None:
        self.inner = aiohttp.DefaultResolver()
        self.allow_private = allow_private
        # The proxies of the environment: the operator's, not a tenant's.
        self.exempt = exempt

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        if host.lower() in self.exempt:
            return found
        allowed, refusals = [], []
        for result in found:
            refusal = address_refusal(
                ipaddress.ip_address(result["host"]), allow_private=self.allow_private
            )
            if refusal is None:
                allowed.append(result)
            else:
                refusals.append(refusal)
        if not allowed:
            addresses = ", ".join(result["host"] for result in found)
            raise _Refused(f"{host} resolves to {addresses}: {refusals[0]}")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def _proxy_hosts() -> frozenset[str]:
    hosts = set()
    for name, url in urllib.request.getproxies().items():
        if name != "no":
            host = urlsplit(url if "//" in url else f"//{url}").hostname
            if host:
                hosts.add(host.lower())
    return frozenset(hosts)


async def _read_capped(response: aiohttp.ClientResponse, limit: int | None) -> bytes:
    if limit is None:
        return await response.read()
    declared = response.content_length
    # A declared length is the encoded one; decoded, the body only grows.
    if declared is not None and declared > limit:
        raise ResponseTooLarge(f"the answer declares {declared} bytes")
    body = bytearray()
    while chunk := await response.content.readany():
        body += chunk
        if len(body) > limit:
            raise ResponseTooLarge(f"the answer holds more than {limit} bytes")
    return bytes(body)


@cache
def _tls_context() -> ssl.SSLContext:
    # The CA bundle httpx trusts, not whatever the system has; loaded once.
    return ssl.create_default_context(cafile=certifi.where())


def _client_timeout(timeout: dict[str, float | None]) -> aiohttp.ClientTimeout:
    pool, connect = timeout.get("pool"), timeout.get("connect")
    # aiohttp's `connect` covers waiting for a pooled connection and opening it.
    waiting = None if pool is None or connect is None else pool + connect
    return aiohttp.ClientTimeout(
        total=None, connect=waiting, sock_connect=connect, sock_read=timeout.get("read")
    )


def _httpx_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(message, request=request)
    if isinstance(exc, aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message, request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message, request=request)
    return httpx.ReadError(message, request=request)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (opened on first use, on the running loop) per transport."""

    # Below the 5 s after which Node (Evolution) and uvicorn close an idle
    # connection: reusing one the server is closing fails the request.
    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float = 4.0,
        allow_private: bool = True,
        max_response_bytes: int | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.allow_private = allow_private
        self.max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            resolver = CheckedResolver(allow_private=self.allow_private, exempt=_proxy_hosts())
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    resolver=resolver,
                    limit=self.max_connections,
                    keepalive_timeout=self.keepalive_expiry,
                    # Tenants' agent and Evolution hosts change behind DNS.
                    ttl_dns_cache=60,
                    ssl=_tls_context(),
                ),
                # HTTP(S)_PROXY and NO_PROXY, as httpx's own transport honours them.
                # Only when some are set: aiohttp then reads the environment on
                # every request (8 % of a busy hub's CPU).
                trust_env=bool(urllib.request.getproxies()),
                # Decoded here, as read, so that the size cap holds for the decoded
                # body; httpx sets every header it sends.
                auto_decompress=True,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # A host written as an address never reaches the resolver (aiohttp
        # connects to it directly): checked here.
        address = literal_address(request.url.host)
        refusal = address and address_refusal(address, allow_private=self.allow_private)
        if refusal:
            raise DestinationRefused(refusal, request=request)
        body = await request.aread()
        # A call that expects a large answer (a media file) says so per request.
        limit = request.extensions.get(MAX_RESPONSE_BYTES, self.max_response_bytes)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() != b"accept-encoding"
        ]
        headers.append(("Accept-Encoding", ACCEPT_ENCODING))
        try:
            async with self._open().request(
                request.method,
                str(request.url),
                data=body or None,
                headers=headers,
                timeout=_client_timeout(request.extensions.get("timeout", {})),
                allow_redirects=False,
                compress=None,
            ) as response:
                content = await _read_capped(response, limit)
        except _Refused as exc:
            raise DestinationRefused(str(exc), request=request) from exc
        except ResponseTooLarge as exc:
            raise ResponseTooLarge(
                f"{exc} ("
                + (
                    f"OUTBOUND_MAX_RESPONSE_BYTES is {limit}"
                    if limit == self.max_response_bytes
                    else f"this call's cap is {limit} bytes"
                )
                + "); "
                "not read further",
                request=request,
            ) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _httpx_error(exc, request) from exc
        return httpx.Response(
            response.status,
            # The body is decoded already: httpx must not decode it again.
            headers=[(k, v) for k, v in response.raw_headers if k.lower() not in _DECODED_RAW],
            content=content,
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
