"""The outbox: queueing, the dispatcher's steps and outcomes, pacing, the daily
limit and warm-up, rate-limit pauses, messages.update, against httpx.MockTransport."""

import asyncio
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from instances.models import InstanceConfig
from tests.conftest import load_fixture
from tests.webhooks.conftest import found_page
from webhooks import outbox
from webhooks.dispatcher import Dispatcher
from webhooks.ingest import record_delivery
from webhooks.models import (
    OutboundKind,
    OutboundMessage,
    OutboundStatus,
    OutboxState,
)
from webhooks.outbox import Action, Outcome

pytestmark = pytest.mark.pipeline

JID = "5511987654321@s.whatsapp.net"


def queue(instance: InstanceConfig, text: str = "Olá", **fields: Any) -> OutboundMessage:
    fields.setdefault("chat_jid", JID)
    return outbox.queue_send(instance=instance, text=text, **fields).message


def hold(instance: InstanceConfig) -> outbox.Held:
    [held] = [h for h in outbox.claim_outboxes(limit=10) if h.instance.pk == instance.pk]
    return held


def hold_two(instance: InstanceConfig) -> outbox.Held:
    """Two sends queued ("1", "2") and the instance's outbox held."""
    queue(instance, "1")
    queue(instance, "2")
    return hold(instance)


def step(held: outbox.Held) -> outbox.Next:
    return outbox.next_step(instance_id=held.instance.pk, token=held.token)


def finish(held: outbox.Held, row: OutboundMessage, outcome: Outcome, **kw: Any):
    return outbox.finish_send(
        row_id=row.pk,
        attempt=row.attempts,
        instance_id=held.instance.pk,
        token=held.token,
        outcome=outcome,
        **kw,
    )


def status_of(row: OutboundMessage) -> str:
    row.refresh_from_db()
    return row.status


# --- queueing and the claim -------------------------------------------------------------


@pytest.mark.django_db
def test_a_queued_send_makes_its_instance_s_outbox_due_and_one_dispatcher_holds_it(
    make_instance,
) -> None:
    acme = make_instance()
    row = queue(acme)

    assert row.status == OutboundStatus.QUEUED and row.kind == OutboundKind.API
    held = hold(acme)
    assert outbox.claim_outboxes(limit=10) == []  # held: nobody else takes it
    assert step(held).action is Action.SEND
    assert status_of(row) == OutboundStatus.SENDING


@pytest.mark.django_db
def test_the_same_idempotency_key_gives_back_the_first_row_and_queues_nothing(
    make_instance,
) -> None:
    acme, other = make_instance(), make_instance(name="other")
    first = outbox.queue_send(
        instance=acme, chat_jid=JID, text="a", idempotency_key="k1", body_hash="h"
    )
    again = outbox.queue_send(
        instance=acme, chat_jid=JID, text="a", idempotency_key="k1", body_hash="h"
    )
    elsewhere = outbox.queue_send(
        instance=other, chat_jid=JID, text="a", idempotency_key="k1", body_hash="h"
    )

    assert first.created and not again.created and elsewhere.created
    assert again.message.pk == first.message.pk
    assert OutboundMessage.objects.filter(instance=acme).count() == 1


@pytest.mark.django_db
def test_a_send_at_in_the_future_releases_the_outbox_until_then(make_instance) -> None:
    acme = make_instance()
    later = timezone.now() + timedelta(hours=1)
    queue(acme, send_at=later)

    assert outbox.claim_outboxes(limit=10) == []
    assert OutboxState.objects.get(instance=acme).due_at == later


@pytest.mark.django_db
def test_sends_go_in_the_order_accepted_and_an_operator_s_first(make_instance) -> None:
    acme = make_instance(send_interval_ms=0)
    first = queue(acme, "1")
    second = queue(acme, "2")
    operator = queue(acme, "console", kind=OutboundKind.OPERATOR)
    held = hold(acme)

    order = []
    for _ in range(3):
        nxt = step(held)
        assert nxt.action is Action.SEND
        order.append(nxt.row.pk)
        finish(held, nxt.row, Outcome.SENT, evolution_id=f"ID{nxt.row.pk}")

    assert order == [operator.pk, first.pk, second.pk]
    assert step(held).action is Action.RELEASED


# --- pacing -------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_next_send_waits_the_jittered_interval_after_the_last(make_instance) -> None:
    acme = make_instance(send_interval_ms=2000)
    held = hold_two(acme)
    sent = step(held)
    finish(held, sent.row, Outcome.SENT, evolution_id="A")

    waiting = step(held)

    state = OutboxState.objects.get(instance=acme)
    assert 2000 <= state.next_gap_ms <= 2800  # 1.0 to 1.4 times the interval
    assert waiting.action is Action.WAIT and waiting.reason == "interval"
    assert waiting.until == state.last_send_at + timedelta(milliseconds=state.next_gap_ms)


@pytest.mark.django_db
def test_a_send_posted_late_paces_the_next_from_its_post_not_its_planned_time(
    make_instance,
) -> None:
    acme = make_instance(send_interval_ms=2000)
    held = hold_two(acme)
    sent = step(held)
    posted = sent.at + timedelta(milliseconds=150)  # the loop was busy
    finish(held, sent.row, Outcome.SENT, evolution_id="A", posted_late_at=posted)

    waiting = step(held)

    state = OutboxState.objects.get(instance=acme)
    assert state.last_send_at == posted
    assert waiting.until == posted + timedelta(milliseconds=state.next_gap_ms)


@pytest.mark.django_db
def test_a_reply_just_sent_delays_the_next_api_send(make_instance) -> None:
    acme = make_instance(send_interval_ms=3000)
    queue(acme)
    # A reply recorded `sending` by the chat's worker a moment ago.
    reply = OutboundMessage.objects.create(instance=acme, chat_jid=JID, text="reply")
    held = hold(acme)

    waiting = step(held)

    assert waiting.action is Action.WAIT
    assert waiting.until == reply.created_at + timedelta(milliseconds=3000)


@pytest.mark.django_db
def test_a_wait_longer_than_a_few_seconds_lets_the_outbox_go_until_then(make_instance) -> None:
    acme = make_instance(send_interval_ms=60_000)
    held = hold_two(acme)
    finish(held, step(held).row, Outcome.SENT, evolution_id="A")

    nxt = step(held)

    assert nxt.action is Action.RELEASED and nxt.reason == "interval"
    state = OutboxState.objects.get(instance=acme)
    assert state.claim_token == "" and state.due_at == nxt.until


# --- the daily limit and warm-up ---------------------------------------------------------


@pytest.mark.django_db
def test_the_daily_limit_holds_back_the_send_over_it_until_tomorrow_and_says_so(
    make_instance,
) -> None:
    acme = make_instance(send_interval_ms=0, daily_send_limit=2)
    rows = [queue(acme, str(n)) for n in range(3)]
    held = hold(acme)
    for _ in range(2):
        finish(held, step(held).row, Outcome.SENT, evolution_id="x")

    nxt = step(held)

    assert nxt.action is Action.RELEASED and nxt.reason == "daily_limit"
    rows[2].refresh_from_db()
    assert rows[2].status == OutboundStatus.QUEUED
    assert rows[2].wait_reason.startswith("daily send limit reached (2 of 2 today): waits for")
    tomorrow = (timezone.now() + timedelta(days=1)).date()
    assert OutboxState.objects.get(instance=acme).due_at.date() == tomorrow


@pytest.mark.django_db
def test_replies_and_operator_sends_never_count_against_the_daily_limit(make_instance) -> None:
    acme = make_instance(send_interval_ms=0, daily_send_limit=1)
    queue(acme, "api")
    queue(acme, "api 2")
    queue(acme, "console", kind=OutboundKind.OPERATOR)
    held = hold(acme)
    kinds = []
    while (nxt := step(held)).action is Action.SEND:
        kinds.append(nxt.row.kind)
        finish(held, nxt.row, Outcome.SENT, evolution_id="x")

    assert kinds == ["operator", "api"]
    assert OutboxState.objects.get(instance=acme).sends_today == 1


@pytest.mark.parametrize(
    ("day", "expected"), [(0, 10), (1, 32), (2, 55), (3, 77), (4, 100), (30, 100)]
)
def test_warm_up_ramps_the_daily_limit_from_a_tenth_to_all_of_it(day: int, expected: int) -> None:
    instance = InstanceConfig(daily_send_limit=100, warmup_days=4)
    first = date(2026, 1, 1)

    assert (
        outbox.daily_limit_today(instance=instance, first_day=first, today=first + timedelta(day))
        == expected
    )


def test_without_a_daily_limit_warm_up_limits_nothing() -> None:
    instance = InstanceConfig(daily_send_limit=0, warmup_days=10)
    assert outbox.daily_limit_today(instance=instance, first_day=None, today=date.today()) == 0


# --- outcomes -----------------------------------------------------------------------


@pytest.mark.django_db
def test_rate_overlimit_pauses_the_outbox_and_requeues_the_send_doubling_up_to_an_hour(
    make_instance,
) -> None:
    acme = make_instance(send_interval_ms=0, send_backoff_minutes=20)
    row = queue(acme)
    pauses = []
    for _ in range(3):
        OutboxState.objects.filter(instance=acme).update(paused_until=None, due_at=timezone.now())
        held = hold(acme)
        sending = step(held).row
        finished = finish(held, sending, Outcome.RATE_LIMITED, error="rate-overlimit")
        pauses.append(OutboxState.objects.get(instance=acme).backoff_minutes)
        assert finished.paused_until is not None

    assert pauses == [20, 40, 60]
    assert status_of(row) == OutboundStatus.QUEUED
    assert "rate limit" in row.wait_reason
    assert step(hold_after_pause(acme)).action is Action.RELEASED


def hold_after_pause(instance: InstanceConfig) -> outbox.Held:
    OutboxState.objects.filter(instance=instance).update(due_at=timezone.now())
    return hold(instance)


@pytest.mark.django_db
def test_three_5xx_in_a_row_pause_the_outbox_and_a_success_resets_the_backoff(
    make_instance,
) -> None:
    acme = make_instance(send_interval_ms=0, send_backoff_minutes=5)
    row = queue(acme)
    held = hold(acme)
    outcomes = [finish(held, step(held).row, Outcome.RETRY, error="503").outcome for _ in range(3)]

    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.RATE_LIMITED]
    OutboxState.objects.filter(instance=acme).update(paused_until=None, due_at=timezone.now())
    held = hold(acme)
    again = step(held)
    assert again.failing  # the dispatcher passes it on: the success must reset
    finish(held, again.row, Outcome.SENT, evolution_id="OK", failing=again.failing)
    assert status_of(row) == OutboundStatus.SENT and row.attempts == 4
    assert OutboxState.objects.get(instance=acme).backoff_minutes == 0


@pytest.mark.django_db
def test_a_hold_s_later_steps_skip_the_look_for_rows_in_doubt_and_a_reset_of_no_failures(
    make_instance,
) -> None:
    held = hold_two(make_instance(send_interval_ms=0))
    acme = held.instance

    with CaptureQueriesContext(connection) as first:
        sent = step(held)
    with CaptureQueriesContext(connection) as finished:
        finish(held, sent.row, Outcome.SENT, evolution_id="X", failing=sent.failing)
    with CaptureQueriesContext(connection) as later:
        second = outbox.next_step(instance_id=acme.pk, token=held.token, check_doubt=False)

    def in_doubt(captured: CaptureQueriesContext) -> list[str]:
        return [q["sql"] for q in captured.captured_queries if "'unconfirmed'" in q["sql"]]

    assert len(in_doubt(first)) == 1 and in_doubt(later) == []
    assert second.action is Action.SEND and second.row.text == "2"
    assert not sent.failing
    assert not [q for q in finished.captured_queries if "failures_in_row" in q["sql"]]


@pytest.mark.django_db
def test_a_row_left_sending_is_checked_before_anything_else_goes(make_instance) -> None:
    acme = make_instance(send_interval_ms=0)
    first = queue(acme, "1")
    queue(acme, "2")
    held = hold(acme)
    step(held)  # `sending`, then the dispatcher died: its lease runs out
    OutboxState.objects.filter(instance=acme).update(due_at=timezone.now())

    nxt = step(hold(acme))

    assert nxt.action is Action.CHECK and nxt.row.pk == first.pk
    outbox.settle_in_doubt(row_id=first.pk, sent_id="FOUND")
    assert status_of(first) == OutboundStatus.SENT and first.evolution_id == "FOUND"


# --- messages.update ----------------------------------------------------------------


@pytest.mark.django_db
def test_messages_update_moves_a_sent_message_to_delivered_then_read(make_instance) -> None:
    acme = make_instance()
    key_id = load_fixture("messages-update-delivered.json")["data"]["keyId"]
    row = OutboundMessage.objects.create(
        instance=acme, chat_jid=JID, text="hi", status=OutboundStatus.SENT, evolution_id=key_id
    )

    record_delivery(instance=acme, body=load_fixture("messages-update-delivered.json"))
    row.refresh_from_db()
    assert row.status == OutboundStatus.DELIVERED and row.delivered_at is not None

    record_delivery(instance=acme, body=load_fixture("messages-update-read.json"))
    row.refresh_from_db()
    assert row.status == OutboundStatus.READ and row.read_at is not None
    # A late delivery receipt does not move it back.
    record_delivery(instance=acme, body=load_fixture("messages-update-delivered.json"))
    assert status_of(row) == OutboundStatus.READ


@pytest.mark.django_db
def test_messages_update_of_another_instance_s_message_changes_nothing(make_instance) -> None:
    acme, other = make_instance(), make_instance(name="other")
    key_id = load_fixture("messages-update-read.json")["data"]["keyId"]
    row = OutboundMessage.objects.create(
        instance=other, chat_jid=JID, text="hi", status=OutboundStatus.SENT, evolution_id=key_id
    )

    record_delivery(instance=acme, body=load_fixture("messages-update-read.json"))

    assert status_of(row) == OutboundStatus.SENT


# --- the dispatcher against a mocked Evolution --------------------------------------------


class Evolution:
    """sendText/sendMedia answered in turn from `answers`, then 201 with a new key."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.find: Any = (200, found_page([]))

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if "/chat/findMessages/" in request.url.path:
            status, body = self.find
            return httpx.Response(status, json=body)
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        if answer is None:
            answer = (201, {"key": {"id": f"3EB0{len(self.requests)}"}, "status": "PENDING"})
        return httpx.Response(answer[0], json=answer[1])

    def sends(self) -> list[httpx.Request]:
        return [r for r in self.requests if "/message/send" in r.url.path]


async def drain(evolution: Evolution, *, until: Any, timeout: float = 10.0) -> None:
    """Run a dispatcher until `until()` (sync, on the database) is true."""
    stop = asyncio.Event()
    async with httpx.AsyncClient(transport=httpx.MockTransport(evolution.handle)) as http:
        dispatcher = Dispatcher(http=http, poll_interval=0.05)
        task = asyncio.create_task(dispatcher.run(stop=stop))
        try:
            async with asyncio.timeout(timeout):
                while not await sync_to_async(until)():
                    await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task


def rows_of(instance: InstanceConfig) -> list[OutboundMessage]:
    return list(OutboundMessage.objects.filter(instance=instance).order_by("id"))


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_dispatcher_sends_text_and_media_and_records_evolution_s_key_id(
    make_instance,
) -> None:
    acme = await sync_to_async(make_instance)(send_interval_ms=0)
    media = {
        "url": "https://cdn.example.com/a.png",
        "mime_type": "image/png",
        "file_name": "a.png",
        "caption": "Catálogo",
        "mediatype": "image",
    }
    await sync_to_async(queue)(acme, "Olá")
    await sync_to_async(queue)(acme, "Catálogo", media=media)
    evolution = Evolution()

    def done() -> bool:
        return all(r.status == OutboundStatus.SENT for r in rows_of(acme))

    await drain(evolution, until=done)

    text, image = evolution.sends()
    assert text.url.path == f"/message/sendText/{acme.evolution_instance_name}"
    assert text.headers["apikey"] == "acme-evolution-key"
    assert image.url.path.startswith("/message/sendMedia/")
    rows = await sync_to_async(rows_of)(acme)
    assert [r.evolution_id for r in rows] == ["3EB01", "3EB02"]
    assert all(r.sent_at for r in rows)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_4xx_fails_the_send_with_evolution_s_error_and_the_next_goes(
    make_instance,
) -> None:
    acme = await sync_to_async(make_instance)(send_interval_ms=0)
    await sync_to_async(queue)(acme, "bad")
    await sync_to_async(queue)(acme, "good")
    refused = (
        400,
        {"status": 400, "error": "Bad Request", "response": {"message": ["exists: false"]}},
    )
    evolution = Evolution(refused)

    def done() -> bool:
        return {r.status for r in rows_of(acme)} == {"failed", "sent"}

    await drain(evolution, until=done)

    bad, good = await sync_to_async(rows_of)(acme)
    assert bad.status == OutboundStatus.FAILED and "exists: false" in bad.error
    assert good.status == OutboundStatus.SENT


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_rate_overlimit_answer_pauses_the_instance_and_drops_nothing(
    make_instance,
) -> None:
    acme = await sync_to_async(make_instance)(send_interval_ms=0)
    row = await sync_to_async(queue)(acme)
    limited = (
        500,
        {
            "status": 500,
            "error": "Internal Server Error",
            "response": {"message": "rate-overlimit"},
        },
    )
    evolution = Evolution(limited)

    def paused() -> bool:
        return bool(OutboxState.objects.get(instance=acme).paused_until)

    await drain(evolution, until=paused)

    await sync_to_async(row.refresh_from_db)()
    assert row.status == OutboundStatus.QUEUED
    state = await sync_to_async(OutboxState.objects.get)(instance=acme)
    assert state.backoff_minutes == 5 and "rate limit" in state.pause_reason
    assert "PAUSED until" in state.describe()
    assert len(evolution.sends()) == 1


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_send_left_sending_by_a_dead_dispatcher_and_found_in_evolution_is_not_sent_again(
    make_instance,
) -> None:
    acme = await sync_to_async(make_instance)(send_interval_ms=0)
    row = await sync_to_async(queue)(acme, "Pedido confirmado")

    def died_mid_send() -> None:
        held = hold(acme)
        step(held)
        OutboxState.objects.filter(instance=acme).update(due_at=timezone.now())

    await sync_to_async(died_mid_send)()
    evolution = Evolution()
    evolution.find = (
        200,
        found_page(
            [
                {
                    "key": {"id": "3EBFOUND", "remoteJid": JID, "fromMe": True},
                    "message": {"conversation": "Pedido confirmado"},
                    "messageTimestamp": int(timezone.now().timestamp()),
                }
            ]
        ),
    )

    def done() -> bool:
        return OutboundMessage.objects.get(pk=row.pk).status == OutboundStatus.SENT

    await drain(evolution, until=done)

    await sync_to_async(row.refresh_from_db)()
    assert row.evolution_id == "3EBFOUND"
    assert evolution.sends() == []


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_send_left_sending_and_not_in_evolution_goes_once(make_instance) -> None:
    acme = await sync_to_async(make_instance)(send_interval_ms=0)
    row = await sync_to_async(queue)(acme, "Pedido confirmado")
    # Evolution keeps messages: another chat's message of the hub's is there.
    await sync_to_async(OutboundMessage.objects.create)(
        instance=acme,
        chat_jid="5511900000000@s.whatsapp.net",
        text="x",
        status=OutboundStatus.SENT,
        evolution_id="3EBOTHER",
    )

    def died_mid_send() -> None:
        held = hold(acme)
        step(held)
        OutboxState.objects.filter(instance=acme).update(due_at=timezone.now())

    await sync_to_async(died_mid_send)()
    evolution = Evolution()

    evolution.find = (200, found_page([{"key": {"id": "3EBOTHER", "fromMe": True}}]))

    def done() -> bool:
        return OutboundMessage.objects.get(pk=row.pk).status == OutboundStatus.SENT

    await drain(evolution, until=done)

    assert len(evolution.sends()) == 1


# --- cost: the dispatcher's statements do not grow with the stored rows -------------
OUTBOX_INDEXES = (
    "webhooks_outbox_due",
    "webhooks_outbox_operator",
    "webhooks_outbox_in_doubt",
    "webhooks_outboundmessage_created_at",
    "webhooks_outbox_state_due",
    "sqlite_autoindex_webhooks_outboxstate",
    "INTEGER PRIMARY KEY",
)


def sqlite_plan(sql: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {sql}")
        return [row[-1] for row in cursor.fetchall()]


@pytest.mark.django_db
def test_the_dispatcher_s_statements_read_the_outbox_s_own_indexes_only(
    make_instance, monkeypatch
) -> None:
    from tests.webhooks import test_claim_plan

    monkeypatch.setattr(
        test_claim_plan, "TABLES", ("webhooks_outboundmessage", "webhooks_outboxstate")
    )

    acme = make_instance(send_interval_ms=0)
    for n in range(3):  # sent rows of the instance, which no step may walk
        OutboundMessage.objects.create(
            instance=acme, chat_jid=JID, text="old", status=OutboundStatus.SENT, evolution_id=str(n)
        )
    queue(acme, "1")
    queue(acme, "2")

    with CaptureQueriesContext(connection) as captured:
        held = hold(acme)
        sent = step(held)
        finish(held, sent.row, Outcome.SENT, evolution_id="X")
        second = step(held)
        finish(held, second.row, Outcome.SENT, evolution_id="Y")
        assert step(held).action is Action.RELEASED

    statements = [
        q["sql"]
        for q in captured.captured_queries
        if q["sql"].startswith(("SELECT", "UPDATE")) and "webhooks_out" in q["sql"]
    ]
    assert len(statements) >= 10, statements
    for sql in statements:
        assert test_claim_plan.table_scans(sql) == [], sql
        if connection.vendor == "sqlite":
            for line in sqlite_plan(sql):
                if "webhooks_out" in line and line.startswith(("SEARCH", "SCAN")):
                    assert any(index in line for index in OUTBOX_INDEXES), (line, sql)


@pytest.mark.django_db
def test_nothing_is_sent_while_the_number_is_not_connected_and_open_makes_it_due(
    make_instance,
) -> None:
    acme = make_instance(send_interval_ms=0)
    row = queue(acme)
    record_delivery(instance=acme, body=load_fixture("connection-update-close.json"))

    nxt = step(hold(acme))

    assert nxt.action is Action.RELEASED and nxt.reason == "not_connected"
    assert status_of(row) == OutboundStatus.QUEUED
    record_delivery(instance=acme, body=load_fixture("connection-update-open.json"))
    assert step(hold(acme)).action is Action.SEND
