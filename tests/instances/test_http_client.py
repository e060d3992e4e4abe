"""The process's outbound HTTP client (instances/clients/http.py)."""

import httpx
import pytest

from instances.clients.http import CookielessClient, new_http_client


def _server(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"set-cookie": "affinity=tenant-a; Path=/"}, json={})

    return httpx.MockTransport(handle)


@pytest.mark.asyncio
async def test_a_cookie_one_tenants_server_sets_never_goes_with_a_later_request() -> None:
    seen: list[httpx.Request] = []
    async with CookielessClient(transport=_server(seen)) as http:
        first = await http.post("http://agents.example/tenant-a/run", json={})
        await http.post("http://agents.example/tenant-b/run", json={})

    assert first.headers["set-cookie"].startswith("affinity=")
    assert "cookie" not in seen[1].headers
    assert not http.cookies


@pytest.mark.asyncio
async def test_the_process_client_keeps_no_cookies() -> None:
    async with new_http_client(max_connections=1) as http:
        assert isinstance(http, CookielessClient)
        http.cookies = {"a": "1"}
        assert not http.cookies


@pytest.mark.parametrize("cookies", [None, {"a": "1"}])
def test_cookies_given_to_the_client_are_not_kept(cookies) -> None:
    client = CookielessClient(cookies=cookies)

    assert not client.cookies
