"""The aiohttp transport under the hub's httpx client, against real loopback sockets.

The callers decide on the httpx error type whether a retry could act twice, so
each failure must come out as the httpx error of what really happened.
"""

import asyncio
import gzip
import socket
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
from django.test import override_settings

from instances.clients.agents.automagik.transport import Automagik
from instances.clients.aiohttp_transport import MAX_RESPONSE_BYTES, AiohttpTransport
from instances.clients.evolution import EvolutionClient, EvolutionTarget
from instances.clients.http import (
    DestinationRefused,
    OutboundError,
    ResponseTooLarge,
    new_http_client,
)
from tests.fakes import FakeAgent, FakeEvolution
from tests.webhooks.conftest import unsaved_instance

pytestmark = pytest.mark.asyncio


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A loopback server whose every connection is handled by the given function."""
    servers: list[socket.socket] = []

    def start(handle: Callable[[socket.socket], None]) -> str:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{server.getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def silent_server(raw_server) -> tuple[str, threading.Event]:
    """A server that reads each request and answers nothing until released."""
    release = threading.Event()

    def handle(conn: socket.socket) -> None:
        read_request(conn)
        release.wait(5)
        conn.close()

    return raw_server(handle), release


async def test_it_sends_the_request_and_returns_the_response() -> None:
    evolution = FakeEvolution().start()
    try:
        async with new_http_client(max_connections=4) as http:
            target = EvolutionTarget(base_url=evolution.url, api_key="evo-key", instance_name="x")
            body = await EvolutionClient(target=target, http=http).send_text(
                number="5511999999999", text="olá"
            )
    finally:
        evolution.stop()
    assert body["status"] == "PENDING"
    [request] = evolution.received()
    assert (request.method, request.path) == ("POST", "/message/sendText/x")
    assert request.headers["apikey"] == "evo-key"
    assert request.headers["content-type"] == "application/json"
    assert request.body == {"number": "5511999999999", "text": "olá"}


async def test_it_reuses_one_connection_for_calls_in_sequence() -> None:
    evolution = FakeEvolution().start()
    try:
        async with new_http_client(max_connections=4) as http:
            for _ in range(5):
                response = await http.post(f"{evolution.url}/chat/sendPresence/x", json={})
                assert response.status_code == 201
            connections = http._transport._session.connector._conns  # type: ignore[attr-defined]
            assert sum(len(pooled) for pooled in connections.values()) == 1
    finally:
        evolution.stop()


async def test_it_decodes_a_gzipped_body(raw_server) -> None:
    payload = gzip.compress(b'{"message": "hi"}')

    def handle(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
            + f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        conn.close()

    url = raw_server(handle)
    async with new_http_client(max_connections=2) as http:
        response = await http.get(url)
    assert response.json() == {"message": "hi"}


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with new_http_client(max_connections=2) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{closed_port()}/")


async def test_a_server_that_never_answers_is_a_read_timeout(raw_server) -> None:
    url, release = silent_server(raw_server)
    try:
        async with new_http_client(max_connections=2) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get(url, timeout=httpx.Timeout(0.2, connect=2.0))
    finally:
        release.set()


async def test_a_connection_closed_without_an_answer_is_a_protocol_error(raw_server) -> None:
    def handle(conn: socket.socket) -> None:
        read_request(conn)
        conn.close()

    url = raw_server(handle)
    async with new_http_client(max_connections=2) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(url, json={"a": 1})


async def test_waiting_too_long_for_a_pooled_connection_is_a_connect_timeout(raw_server) -> None:
    url, release = silent_server(raw_server)
    try:
        async with new_http_client(max_connections=1) as http:
            busy = asyncio.create_task(http.get(url, timeout=5.0))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.ConnectTimeout):
                await http.get(url, timeout=httpx.Timeout(5.0, connect=0.1, pool=0.1))
            release.set()
            with pytest.raises(httpx.RemoteProtocolError):
                await busy
    finally:
        release.set()


async def test_a_malformed_answer_is_a_protocol_error(raw_server) -> None:
    def handle(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"this is not http\r\n\r\n")
        conn.close()

    url = raw_server(handle)
    async with new_http_client(max_connections=2) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)


async def test_it_sends_through_the_proxy_the_environment_names(monkeypatch) -> None:
    proxy = FakeEvolution().start()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        async with new_http_client(max_connections=2) as http:
            response = await http.post("http://evolution.example/chat/sendPresence/x", json={})
    finally:
        proxy.stop()
    assert response.status_code == 201
    [request] = proxy.received()
    assert request.path == "http://evolution.example/chat/sendPresence/x"


# --- where the hub may connect, and how much it reads -------------------------


def transport_client(**options: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AiohttpTransport(max_connections=2, **options))


def answer_with(body: bytes, *, headers: bytes = b"") -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + headers)
        conn.sendall(b"\r\n" + body)
        conn.close()

    return handle


async def test_with_private_addresses_off_a_name_resolving_to_loopback_is_refused() -> None:
    evolution = FakeEvolution().start()
    port = evolution.url.rsplit(":", 1)[1]
    try:
        async with transport_client(allow_private=False) as http:
            with pytest.raises(DestinationRefused) as caught:
                await http.get(f"http://localhost:{port}/instance/connectionState/x")
    finally:
        evolution.stop()

    assert "localhost resolves to 127.0.0.1" in str(caught.value)
    assert "OUTBOUND_ALLOW_PRIVATE is false" in str(caught.value)
    assert evolution.received() == []


async def test_with_private_addresses_on_a_name_resolving_to_loopback_is_called() -> None:
    evolution = FakeEvolution().start()
    port = evolution.url.rsplit(":", 1)[1]
    try:
        async with transport_client(allow_private=True) as http:
            response = await http.post(f"http://localhost:{port}/chat/sendPresence/x", json={})
    finally:
        evolution.stop()

    assert response.status_code == 201


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/"]
)
async def test_a_metadata_address_is_never_connected_to(url: str) -> None:
    async with new_http_client(max_connections=2) as http:
        with pytest.raises(DestinationRefused, match="cloud metadata address"):
            await http.get(url, timeout=httpx.Timeout(5.0, connect=0.5))


async def test_a_refused_destination_fails_the_agent_call_without_a_retry() -> None:
    agent = FakeAgent().start()
    instance = unsaved_instance(agent_api_url=agent.url.replace("127.0.0.1", "localhost"))
    try:
        async with transport_client(allow_private=False) as http:
            with pytest.raises(OutboundError) as caught:
                await Automagik(instance=instance, http=http).run(request={"message_content": "hi"})
    finally:
        agent.stop()

    assert caught.value.retryable is False
    assert str(caught.value).startswith("agent call refused: localhost resolves to 127.0.0.1")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked-or-close"])
async def test_an_answer_larger_than_the_cap_fails_instead_of_being_buffered(
    raw_server, declared: bool
) -> None:
    body = b'{"message": "' + b"x" * 5000 + b'"}'
    headers = f"content-length: {len(body)}\r\n".encode() if declared else b""
    url = raw_server(answer_with(body, headers=headers))

    async with transport_client(max_response_bytes=1000) as http:
        with pytest.raises(ResponseTooLarge, match="OUTBOUND_MAX_RESPONSE_BYTES is 1000"):
            await http.get(url)


async def test_a_call_may_raise_the_cap_for_its_own_answer(raw_server) -> None:
    body = b'{"base64": "' + b"x" * 5000 + b'"}'
    url = raw_server(answer_with(body))

    async with transport_client(max_response_bytes=1000) as http:
        response = await http.get(url, extensions={MAX_RESPONSE_BYTES: 10_000})
        assert len(response.content) == len(body)
        with pytest.raises(ResponseTooLarge, match="this call's cap is 2000 bytes"):
            await http.get(url, extensions={MAX_RESPONSE_BYTES: 2000})


async def test_a_small_gzipped_answer_that_decodes_past_the_cap_fails(raw_server) -> None:
    payload = gzip.compress(b'{"message": "' + b"0" * 100_000 + b'"}')
    assert len(payload) < 1000
    headers = f"content-encoding: gzip\r\ncontent-length: {len(payload)}\r\n".encode()
    url = raw_server(answer_with(payload, headers=headers))

    async with transport_client(max_response_bytes=10_000) as http:
        with pytest.raises(ResponseTooLarge):
            await http.get(url)


async def test_an_answer_within_the_cap_is_read_whole(raw_server) -> None:
    body = b'{"message": "' + b"x" * 900 + b'"}'
    url = raw_server(answer_with(body))

    async with transport_client(max_response_bytes=1000) as http:
        response = await http.get(url)

    assert response.content == body


async def test_a_too_large_agent_answer_fails_the_call_with_a_clear_error(raw_server) -> None:
    url = raw_server(answer_with(b'{"message": "' + b"x" * 5000 + b'"}'))
    instance = unsaved_instance(agent_api_url=url)

    async with transport_client(max_response_bytes=1000) as http:
        with pytest.raises(OutboundError) as caught:
            await Automagik(instance=instance, http=http).run(request={"message_content": "hi"})

    # The agent answered (it acted): calling it again could act twice.
    assert caught.value.retryable is False
    assert "agent call refused: the answer holds more than 1000 bytes" in str(caught.value)


async def test_a_too_large_evolution_answer_fails_the_send_without_a_retry(raw_server) -> None:
    url = raw_server(answer_with(b"x" * 5000))
    target = EvolutionTarget(base_url=url, api_key="k", instance_name="x")

    async with transport_client(max_response_bytes=1000) as http:
        with pytest.raises(OutboundError) as caught:
            await EvolutionClient(target=target, http=http).send_text(number="1", text="hi")

    assert caught.value.retryable is False
    assert "Evolution call refused: the answer holds more than 1000 bytes" in str(caught.value)


@override_settings(OUTBOUND_MAX_RESPONSE_BYTES=1234, OUTBOUND_ALLOW_PRIVATE=False)
async def test_the_hubs_client_takes_its_limits_from_the_settings() -> None:
    async with new_http_client(max_connections=2) as http:
        transport = http._transport  # type: ignore[attr-defined]

    assert (transport.max_response_bytes, transport.allow_private) == (1234, False)
