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

import ssl
import urllib.request
from functools import cache

import aiohttp
import certifi
import httpx


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
    def __init__(self, *, max_connections: int, keepalive_expiry: float = 4.0) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
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
                # httpx decodes the body itself and sets every header it sends.
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
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
                content = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _httpx_error(exc, request) from exc
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            content=content,
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
