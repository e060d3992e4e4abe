"""The outbox end to end: the send API of a hub process, its dispatcher, and the fake
Evolution recording what went out (idempotency, send_at, pacing, the daily limit, a
rate-limit pause, delivery and read receipts, a worker killed mid-send)."""

import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import load_fixture
from tests.e2e.conftest import Tenant
from tests.e2e.harness import Hub, percentile, unique, wait_until
from tests.fakes import Recorded

NUMBER = "5511911115001"


def api_send(tenant: Tenant, body: dict[str, Any], **headers: str) -> httpx.Response:
    return tenant.hub.server.http.request(
        "POST",
        f"/api/v1/instances/{tenant.name}/messages/",
        json=body,
        headers={"x-api-key": "e2e-api-key", **headers},
    )


def api_get(tenant: Tenant, message_id: int) -> dict[str, Any]:
    response = tenant.hub.server.api(
        "GET", f"/api/v1/instances/{tenant.name}/messages/{message_id}/"
    )
    assert response.status_code == 200, response.text
    return response.json()


def texts_sent(tenant: Tenant) -> list[str]:
    return [r.body["text"] for r in tenant.evolution.sent()]


def wait_status(tenant: Tenant, message_id: int, status: str, timeout: float = 20.0) -> dict:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(api_get(tenant, message_id))
        return found["status"] == status

    wait_until(reached, timeout=timeout, interval=0.05, what=f"message {message_id} {status}")
    return found


def test_an_api_send_posted_three_times_with_one_key_is_sent_once(
    make_tenant: Callable[..., Tenant],
) -> None:
    shop = make_tenant(send_interval_ms=0)
    body = {"to": NUMBER, "text": "Seu pedido 42 saiu para entrega.", "idempotency_key": "o-42"}

    answers = [api_send(shop, body) for _ in range(3)]

    assert [a.status_code for a in answers] == [202, 200, 200]
    assert len({a.json()["id"] for a in answers}) == 1
    sent = wait_status(shop, answers[0].json()["id"], "sent")
    time.sleep(0.5)  # a second send would arrive now
    assert texts_sent(shop) == [body["text"]]
    assert sent["key_id"] == shop.evolution.sent()[0].answer["key"]["id"]
    again = api_send(shop, {**body, "text": "another text"})
    assert again.status_code == 409


def test_a_send_at_in_the_future_waits_for_it(make_tenant: Callable[..., Tenant]) -> None:
    shop = make_tenant(send_interval_ms=0)
    at = datetime.now(UTC) + timedelta(seconds=3)

    answer = api_send(shop, {"to": NUMBER, "text": "Lembrete", "send_at": at.isoformat()})

    assert answer.status_code == 202
    time.sleep(1.5)
    assert shop.evolution.sent() == []
    wait_status(shop, answer.json()["id"], "sent", timeout=10)
    [request] = shop.evolution.sent()
    assert request.at >= at.timestamp() - 0.05


def test_ten_sends_to_one_number_are_at_least_send_interval_ms_apart(
    make_tenant: Callable[..., Tenant],
) -> None:
    interval_ms = 300
    shop = make_tenant(send_interval_ms=interval_ms)
    ids = [api_send(shop, {"to": NUMBER, "text": f"m{n}"}).json()["id"] for n in range(10)]

    wait_status(shop, ids[-1], "sent", timeout=30)

    sent = shop.evolution.sent()
    assert [r.body["text"] for r in sent] == [f"m{n}" for n in range(10)]  # in order
    gaps = [b.at - a.at for a, b in itertools.pairwise(sent)]
    print(f"\nten sends, send_interval_ms={interval_ms}: gaps {min(gaps):.3f}-{max(gaps):.3f} s")
    # The fake's clock stamps arrival: a few ms of scheduling either way.
    assert min(gaps) >= interval_ms / 1000 - 0.02
    assert max(gaps) <= interval_ms / 1000 * 1.4 + 1.0


def test_the_daily_limit_holds_back_the_eleventh_send(make_tenant: Callable[..., Tenant]) -> None:
    shop = make_tenant(send_interval_ms=0, daily_send_limit=10)
    ids = [api_send(shop, {"to": NUMBER, "text": f"d{n}"}).json()["id"] for n in range(11)]

    wait_status(shop, ids[9], "sent")
    time.sleep(1.0)

    assert len(shop.evolution.sent()) == 10
    eleventh = api_get(shop, ids[10])
    assert eleventh["status"] == "queued"
    assert eleventh["wait_reason"].startswith("daily send limit reached (10 of 10 today)")


def test_after_stop_an_api_send_to_that_number_is_refused_and_nothing_goes(
    make_tenant: Callable[..., Tenant],
) -> None:
    shop = make_tenant(send_interval_ms=0, opt_out_reply="Ok, no more messages.")
    stop, response = shop.send_text("STOP", phone=NUMBER)
    assert response.status_code == 200, response.text
    shop.wait_finished(stop)

    refused = api_send(shop, {"to": NUMBER, "text": "Promoção de hoje!"})
    other = api_send(shop, {"to": "5511911115002", "text": "Seu pedido saiu."})

    assert refused.status_code == 400, refused.text
    assert "opted out" in refused.json()["to"][0]
    assert other.status_code == 202, other.text
    wait_status(shop, other.json()["id"], "sent")
    # The opt-out reply and the other number's send: nothing else went.
    assert texts_sent(shop) == ["Ok, no more messages.", "Seu pedido saiu."]


def test_a_send_key_sends_through_its_own_instance_only_and_nothing_else(
    make_tenant: Callable[..., Tenant],
) -> None:
    shop = make_tenant(send_interval_ms=0)
    other = make_tenant(send_interval_ms=0)
    created = shop.hub.server.api("POST", f"/api/v1/instances/{shop.name}/send-keys/", json={})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert key.startswith("omnihub_send_")

    own = api_send(shop, {"to": NUMBER, "text": "Pelo CRM."}, **{"x-api-key": key})
    elsewhere = api_send(other, {"to": NUMBER, "text": "Não."}, **{"x-api-key": key})
    http = shop.hub.server.http
    tenant_api = http.get("/api/v1/instances/", headers={"x-api-key": key})
    listing = http.get(f"/api/v1/instances/{shop.name}/messages/", headers={"x-api-key": key})

    assert own.status_code == 202, own.text
    assert (elsewhere.status_code, tenant_api.status_code, listing.status_code) == (403, 403, 403)
    wait_status(shop, own.json()["id"], "sent")
    assert texts_sent(shop) == ["Pelo CRM."]
    assert other.evolution.sent() == []


def test_messages_update_moves_an_outbound_message_to_delivered_and_read(
    make_tenant: Callable[..., Tenant],
) -> None:
    shop = make_tenant(send_interval_ms=0)
    answer = api_send(shop, {"to": NUMBER, "text": "Chegou?"})
    key_id = wait_status(shop, answer.json()["id"], "sent")["key_id"]

    for name, status in (("delivered", "delivered"), ("read", "read")):
        receipt = load_fixture(f"messages-update-{name}.json")
        receipt["data"]["keyId"] = key_id
        receipt["instance"] = shop.fields["whatsapp_instance"]
        assert shop.post(receipt).status_code == 200
        row = wait_status(shop, answer.json()["id"], status, timeout=5)

    assert row["delivered_at"] and row["read_at"]


RATE_LIMITED = (
    500,
    {"status": 500, "error": "Internal Server Error", "response": {"message": "rate-overlimit"}},
)


@pytest.mark.slow
def test_a_rate_overlimit_error_pauses_the_instance_and_it_resumes_after_the_backoff(
    make_tenant: Callable[..., Tenant],
) -> None:
    shop = make_tenant(send_interval_ms=0, send_backoff_minutes=1)
    shop.evolution.answer_next("/message/sendText/", RATE_LIMITED)
    first = api_send(shop, {"to": NUMBER, "text": "p1"}).json()["id"]
    api_send(shop, {"to": NUMBER, "text": "p2"})

    queued = wait_status(shop, first, "queued")
    wait_until(
        lambda: "rate limit" in api_get(shop, first)["wait_reason"], timeout=10, what="paused"
    )
    paused_at = time.monotonic()
    time.sleep(5)
    assert shop.evolution.sent() == []  # paused: nothing else tried
    assert "rate-overlimit" in queued["error"] or api_get(shop, first)["error"]
    metrics = shop.hub.server.http.get("/metrics").text
    assert f'omnihub_outbox_rate_limit_pauses_total{{instance="{shop.name}"}}' in metrics

    wait_status(shop, first, "sent", timeout=90)
    resumed_after = time.monotonic() - paused_at
    wait_until(lambda: len(shop.evolution.sent()) == 2, timeout=10, what="both sent")
    print(f"\nrate-overlimit: paused, resumed {resumed_after:.1f} s later (backoff 1 min)")
    assert texts_sent(shop) == ["p1", "p2"]  # nothing dropped, in order
    assert 55 <= resumed_after <= 75


# --- exactly once across a killed worker ----------------------------------------------
def slow_send(tenant: Tenant, *, hold: float) -> Callable[[Recorded], tuple[int, Any]]:
    """Evolution sends (and keeps) the message, then takes `hold` seconds to answer."""

    def respond(record: Recorded) -> tuple[int, Any]:
        answer = tenant.evolution._send_text(record)
        time.sleep(hold)
        return answer

    return respond


@pytest.mark.parametrize("keeps_messages", [True, False], ids=["evolution-keeps", "keeps-none"])
def test_a_worker_killed_between_the_send_and_its_mark_sends_a_keyed_message_once(
    start_hub: Callable[..., Hub], tenant_on: Callable[..., Tenant], keeps_messages: bool
) -> None:
    hub = start_hub()
    hub.start_server(embedded_worker=False)
    shop = tenant_on(hub, send_interval_ms=0)
    shop.evolution.keeps_messages = keeps_messages
    # Window measured first: Evolution's answer -> the row's `sent` committed.
    warm = [api_send(shop, {"to": NUMBER, "text": f"w{n}"}).json()["id"] for n in range(20)]
    worker = hub.start_worker()
    for message_id in warm:
        wait_status(shop, message_id, "sent")
    rows = {
        r["evolution_id"]: r["sent_at"]
        for r in hub.query("SELECT evolution_id, sent_at FROM webhooks_outboundmessage")
    }
    windows = [
        (_as_datetime(rows[r.answer["key"]["id"]]).timestamp() - r.answered_at) * 1000
        for r in shop.evolution.sent()
    ]

    shop.evolution.on("/message/sendText/", slow_send(shop, hold=3.0))
    body = {"to": NUMBER, "text": "Pagamento aprovado", "idempotency_key": unique("pay")}
    first = api_send(shop, body)
    shop.evolution.wait_for("/message/sendText/", len(warm) + 1, timeout=10)
    worker.kill()  # Evolution has sent it; the hub never hears back
    shop.evolution.on("/message/sendText/", None)
    second = api_send(shop, body)
    restarted = hub.start_worker()
    third = api_send(shop, body)
    wait_until(
        lambda: api_get(shop, first.json()["id"])["status"] == "sent", timeout=30, what="sent"
    )
    time.sleep(0.5)

    copies = texts_sent(shop).count(body["text"])
    print(
        f"\nkeeps_messages={keeps_messages}: window answer->mark over {len(windows)} sends: "
        f"p50 {percentile(windows, 0.5):.1f} ms, max {max(windows):.1f} ms; killed in it: "
        f"sent {copies}x; findMessages calls {len(shop.evolution.received('/chat/findMessages/'))}"
    )
    assert [first.status_code, second.status_code, third.status_code] == [202, 200, 200]
    assert {first.json()["id"], second.json()["id"], third.json()["id"]} == {first.json()["id"]}
    restarted.stop()
    if keeps_messages:
        assert copies == 1
    else:
        # Evolution keeps nothing to look up: sent again, at least once (the window left).
        assert copies == 2
        assert "may be a duplicate" in api_get(shop, first.json()["id"])["error"]


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
