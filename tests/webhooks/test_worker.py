"""Claiming due messages, and the worker loop against a mocked agent and Evolution."""

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.utils import timezone

from instances.models import InstanceConfig
from tests.webhooks.conftest import Upstream, message_body, queue_message, seconds_ago
from webhooks import wakeup, worker
from webhooks.db import run_db
from webhooks.models import Conversation, InboundMessage, Status, WorkerHeartbeat
from webhooks.reply_sending import sending, stop_after_send
from webhooks.transitions import (
    MAX_CLAIMS,
    claim_conversations,
    release_batch,
    take_more_or_settle,
)
from webhooks.worker import Worker

# Also run with the production database path (make test: TEST_GROUP_COMMIT=true -m pipeline).
pytestmark = pytest.mark.pipeline

CHAT_A = "5511911110001"
CHAT_B = "5511922220002"


def queue_in_chat(instance: InstanceConfig, phone: str, message_id: str, **fields: Any):
    return queue_message(instance, message_body(message_id=message_id, phone=phone), **fields)


def claimed_ids(limit: int = 10) -> list[list[str]]:
    """The message ids of each claimed chat."""
    return [[m.message_id for m in batch.messages] for batch in claim_conversations(limit=limit)]


def conversation_of(instance: InstanceConfig, phone: str) -> Conversation:
    return Conversation.objects.get(instance=instance, chat_jid=f"{phone}@s.whatsapp.net")


# --- claim_conversations ----------------------------------------------------------


@pytest.mark.django_db
def test_a_chat_is_claimed_once_with_its_oldest_message(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(acme, CHAT_A, "A1")
    queue_in_chat(acme, CHAT_A, "A2")
    queue_in_chat(acme, CHAT_B, "B1")

    [chat_a, chat_b] = claim_conversations(limit=10)

    assert ([m.message_id for m in chat_a.messages], [m.message_id for m in chat_b.messages]) == (
        ["A1"],
        ["B1"],
    )
    # Held: nothing of it is claimed again, not even a message arriving now.
    queue_in_chat(acme, CHAT_A, "A3")
    assert claimed_ids() == []
    # Its holder takes the next ones, in order, when done with the first.
    InboundMessage.objects.filter(message_id="A1").update(status=Status.REPLIED)
    more = take_more_or_settle(conversation=chat_a.conversation, token=chat_a.token)
    assert [m.message_id for m in more] == ["A2"]


@pytest.mark.django_db
def test_with_debounce_a_chat_s_burst_is_claimed_together(make_instance) -> None:
    acme = make_instance(debounce_seconds=5)
    queue_in_chat(acme, CHAT_A, "A1")
    queue_in_chat(acme, CHAT_A, "A2")
    assert claimed_ids() == []  # the window is open

    Conversation.objects.update(due_at=timezone.now())
    InboundMessage.objects.update(queued_at=timezone.now() - timedelta(seconds=6))
    assert claimed_ids() == [["A1", "A2"]]


@pytest.mark.django_db
def test_a_holder_done_with_a_chat_lets_it_go_due_when_its_next_message_is(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(acme, CHAT_A, "A1")
    [batch] = claim_conversations(limit=10)
    InboundMessage.objects.filter(message_id="A1").update(status=Status.REPLIED)

    assert take_more_or_settle(conversation=batch.conversation, token=batch.token) == []
    chat = conversation_of(acme, CHAT_A)
    assert (chat.claim_token, chat.due_at) == ("", None)


@pytest.mark.django_db
def test_a_message_waiting_for_a_retry_holds_back_the_rest_of_its_chat(make_instance) -> None:
    acme = make_instance()
    later = timezone.now() + timedelta(minutes=1)
    queue_in_chat(acme, CHAT_A, "A1", next_attempt_at=later)
    queue_in_chat(acme, CHAT_A, "A2")

    assert claimed_ids() == []
    # The chat is due again when the retry is.
    assert conversation_of(acme, CHAT_A).due_at == later


@pytest.mark.django_db
def test_chats_of_different_instances_are_independent(make_instance) -> None:
    acme = make_instance()
    other = make_instance(name="other", whatsapp_instance="other-wa")
    queue_in_chat(acme, CHAT_A, "A1")
    queue_in_chat(other, CHAT_A, "A1")

    assert [b.instance.name for b in claim_conversations(limit=10)] == ["acme", "other"]


@pytest.mark.django_db
def test_finished_messages_do_not_hold_back_their_chat(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(acme, CHAT_A, "A1", status=Status.FAILED)
    queue_in_chat(acme, CHAT_A, "A2", status=Status.IGNORED)
    queue_in_chat(acme, CHAT_A, "A3")

    assert claimed_ids() == [["A3"]]


@pytest.mark.django_db
def test_it_reclaims_a_chat_whose_lease_expired(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(acme, CHAT_A, "A1", status=Status.PROCESSING, claim_token="dead", attempts=1)
    queue_in_chat(acme, CHAT_B, "B1", status=Status.PROCESSING, claim_token="live", attempts=1)
    Conversation.objects.filter(chat_jid__startswith=CHAT_A).update(
        claim_token="dead", due_at=seconds_ago(1)
    )
    Conversation.objects.filter(chat_jid__startswith=CHAT_B).update(
        claim_token="live", due_at=timezone.now() + timedelta(seconds=30)
    )

    [batch] = claim_conversations(limit=10)

    [message] = batch.messages
    assert message.message_id == "A1"
    assert message.claim_token not in ("", "dead")
    assert message.attempts == 2
    live = InboundMessage.objects.get(message_id="B1")
    assert (live.claim_token, live.attempts) == ("live", 1)


@pytest.mark.django_db
def test_it_claims_at_most_limit_chats_longest_waiting_first(make_instance) -> None:
    acme = make_instance(max_concurrent=100)
    for n in range(5):
        queue_in_chat(acme, f"55119000000{n:02d}", f"M{n}")

    assert claimed_ids(limit=2) == [["M0"], ["M1"]]
    assert claimed_ids(limit=2) == [["M2"], ["M3"]]
    assert claimed_ids(limit=2) == [["M4"]]
    assert claimed_ids(limit=2) == []


@pytest.mark.django_db
def test_a_tenant_at_its_max_concurrent_leaves_the_slots_to_the_others(make_instance) -> None:
    busy = make_instance(name="busy", max_concurrent=2)
    calm = make_instance(name="calm", whatsapp_instance="calm-wa")
    for n in range(6):
        queue_in_chat(busy, f"55119000000{n:02d}", f"B{n}")
    queue_in_chat(calm, CHAT_A, "C1")

    first = [b.instance.name for b in claim_conversations(limit=10)]
    second = [b.instance.name for b in claim_conversations(limit=10)]

    assert sorted(first) == ["busy", "busy", "calm"]
    assert second == []


@pytest.mark.django_db
def test_tenants_with_due_work_take_the_free_slots_in_turn(make_instance) -> None:
    first = make_instance(name="first")
    second = make_instance(name="second", whatsapp_instance="second-wa")
    for n in range(4):
        queue_in_chat(first, f"55119000000{n:02d}", f"F{n}")
    for n in range(4):
        queue_in_chat(second, f"55119000000{n:02d}", f"S{n}")

    names = [b.instance.name for b in claim_conversations(limit=4)]

    assert sorted(names) == ["first", "first", "second", "second"]


@pytest.mark.django_db
def test_each_claim_leases_its_chats_for_the_agent_s_timeout(make_instance) -> None:
    fast = make_instance(agent_timeout=5)
    slow = make_instance(name="slow", whatsapp_instance="slow-wa", agent_timeout=120)
    queue_in_chat(fast, CHAT_A, "F1")
    queue_in_chat(slow, CHAT_A, "S1")
    before = timezone.now()

    first, second = claim_conversations(limit=10)

    assert re.fullmatch(r"[0-9a-f]{32}", first.token)
    assert first.token == second.token
    margin = django_settings.EVOLUTION_TIMEOUT + django_settings.WORKER_LEASE_MARGIN
    for batch in (first, second):
        [message] = batch.messages
        assert (message.status, message.attempts) == (Status.PROCESSING, 1)
        assert message.claim_token == batch.token
        expected = before + timedelta(seconds=batch.instance.agent_timeout + margin)
        stored = Conversation.objects.get(pk=batch.conversation.pk)
        assert stored.claim_token == batch.token
        assert expected <= stored.due_at <= expected + timedelta(seconds=5)


@pytest.mark.django_db
def test_release_gives_a_chat_and_its_rows_back(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(acme, CHAT_A, "A1")
    [batch] = claim_conversations(limit=10)

    release_batch(batch=batch, error="boom", delay=30.0)

    row = InboundMessage.objects.get(message_id="A1")
    assert (row.status, row.claim_token, row.lease_until) == (Status.QUEUED, "", None)
    assert row.last_error == "boom"
    assert row.next_attempt_at > timezone.now() + timedelta(seconds=25)
    chat = conversation_of(acme, CHAT_A)
    assert chat.claim_token == ""
    assert chat.due_at == row.next_attempt_at


@pytest.mark.django_db
def test_release_fails_a_row_claimed_too_often(make_instance) -> None:
    queue_in_chat(make_instance(), CHAT_A, "A1", attempts=MAX_CLAIMS - 1)
    [batch] = claim_conversations(limit=10)

    release_batch(batch=batch)

    row = InboundMessage.objects.get(message_id="A1")
    assert row.status == Status.FAILED
    assert row.finished_at is not None


@pytest.mark.django_db
def test_release_leaves_a_row_another_worker_claimed(make_instance) -> None:
    queue_in_chat(make_instance(), CHAT_A, "A1")
    [batch] = claim_conversations(limit=10)
    InboundMessage.objects.filter(message_id="A1").update(claim_token="other-worker")

    release_batch(batch=batch)

    assert InboundMessage.objects.get(message_id="A1").claim_token == "other-worker"


# --- Worker.run -----------------------------------------------------------------
# Reads go through run_db like the worker's own: with group commit on, a second
# thread reading the in-memory test database would hit its table locks.


@pytest.fixture
def worker_http(monkeypatch, upstream: Upstream) -> Upstream:
    """Make the worker's own HTTP client talk to `upstream`."""
    monkeypatch.setattr(worker, "new_http_client", lambda **kwargs: upstream.client())
    return upstream


@contextlib.asynccontextmanager
async def running(runner: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """Run the worker for the block; stop it and wait for it after, even on failure."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _replied() -> int:
    return InboundMessage.objects.filter(status=Status.REPLIED).count()


def _row(pk: int) -> InboundMessage:
    return InboundMessage.objects.get(pk=pk)


async def all_replied(total: int) -> bool:
    return await run_db(_replied) == total


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("group_commit", [False, True], ids=["test-thread", "group-commit"])
async def test_the_worker_answers_queued_messages_in_chat_order_and_stops(
    make_instance, worker_http: Upstream, settings, group_commit: bool
) -> None:
    acme = await sync_to_async(make_instance)()
    for phone, message_id in [(CHAT_A, "A1"), (CHAT_A, "A2"), (CHAT_B, "B1")]:
        await sync_to_async(queue_in_chat)(acme, phone, message_id)
    settings.DB_GROUP_COMMIT = group_commit

    async with running(Worker(concurrency=4, poll_interval=0.05)) as task:
        await eventually(lambda: all_replied(3))

    assert task.done() and task.exception() is None
    assert not wakeup.wake_events
    assert not await run_db(WorkerHeartbeat.objects.exists)
    assert sorted(json.loads(r.content)["number"] for r in worker_http.sent) == [
        CHAT_A,
        CHAT_A,
        CHAT_B,
    ]
    asked = [json.loads(r.content) for r in worker_http.agent_calls]
    chat_a = [
        body["channel_payload"]["data"]["key"]["id"]
        for body in asked
        if body["user"]["phone_number"] == f"+{CHAT_A}"
    ]
    assert chat_a == ["A1", "A2"]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_wake_up_starts_a_new_message_before_the_next_poll(
    make_instance, worker_http: Upstream
) -> None:
    acme = await sync_to_async(make_instance)()

    async with running(Worker(concurrency=2, poll_interval=30)):
        await eventually(lambda: _worker_registered())
        await sync_to_async(queue_in_chat)(acme, CHAT_A, "A1")
        wakeup.wake_up()
        await eventually(lambda: all_replied(1), timeout=3)

    assert len(worker_http.sent) == 1


async def _worker_registered() -> bool:
    return bool(wakeup.wake_events)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_stopping_hands_an_unfinished_message_back_to_the_queue(
    make_instance, worker_http: Upstream
) -> None:
    async def hang(request: Any) -> Any:
        await asyncio.Event().wait()

    worker_http.agent = hang
    acme = await sync_to_async(make_instance)()
    queued = await sync_to_async(queue_in_chat)(acme, CHAT_A, "A1")

    async with running(Worker(concurrency=2, poll_interval=0.05, shutdown_grace=0.1)) as task:
        await eventually(lambda: _agent_called(worker_http))

    assert task.exception() is None
    row = await run_db(_row, pk=queued.pk)
    assert (row.status, row.claim_token, row.lease_until) == (Status.QUEUED, "", None)
    assert row.next_attempt_at <= timezone.now()
    assert row.attempts == 1
    assert worker_http.sent == []


async def _agent_called(upstream: Upstream) -> bool:
    return bool(upstream.agent_calls)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_crash_while_processing_requeues_the_message_with_its_error(
    make_instance, worker_http: Upstream, monkeypatch
) -> None:
    async def crash(**kwargs: Any) -> None:
        raise RuntimeError("bug in our code")

    monkeypatch.setattr(worker, "handle_batch", crash)
    acme = await sync_to_async(make_instance)()
    queued = await sync_to_async(queue_in_chat)(acme, CHAT_A, "A1")

    async with running(Worker(concurrency=2, poll_interval=0.05)):
        await eventually(lambda: _released(queued.pk))

    row = await run_db(_row, pk=queued.pk)
    assert row.status == Status.QUEUED
    assert "RuntimeError: bug in our code" in row.last_error
    assert row.next_attempt_at > timezone.now() + timedelta(seconds=20)


async def _released(pk: int) -> bool:
    row = await run_db(_row, pk=pk)
    return row.status == Status.QUEUED and row.attempts == 1 and bool(row.last_error)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_stopping_lets_a_send_in_flight_finish_and_hands_the_chat_s_next_message_back(
    make_instance, worker_http: Upstream
) -> None:
    started = asyncio.Event()

    async def slow_send(request: Any) -> Any:
        started.set()
        await asyncio.sleep(0.5)
        return 201, {"key": {"id": "3EB0SLOW"}}

    worker_http.evolution = slow_send
    acme = await sync_to_async(make_instance)()
    first = await sync_to_async(queue_in_chat)(acme, CHAT_A, "A1")
    # Taken with the first one's final write, after its send.
    second = await sync_to_async(queue_in_chat)(acme, CHAT_A, "A2")

    async with running(Worker(concurrency=2, poll_interval=0.05, shutdown_grace=0.05)):
        await asyncio.wait_for(started.wait(), timeout=5)

    replied, waiting = await run_db(_row, pk=first.pk), await run_db(_row, pk=second.pk)
    assert (replied.status, replied.claim_token) == (Status.REPLIED, "")
    assert (waiting.status, waiting.claim_token) == (Status.QUEUED, "")
    assert len(worker_http.sent) == 1
    assert len(worker_http.agent_calls) == 1


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_stopping_while_a_message_finishes_within_the_grace_waits_for_it(
    make_instance, worker_http: Upstream
) -> None:
    async def slow_agent(request: Any) -> Any:
        await asyncio.sleep(0.2)
        return 200, {"message": "done in time"}

    worker_http.agent = slow_agent
    acme = await sync_to_async(make_instance)()
    queued = await sync_to_async(queue_in_chat)(acme, CHAT_A, "A1")

    async with running(Worker(concurrency=2, poll_interval=0.05, shutdown_grace=2.0)) as task:
        await eventually(lambda: _agent_called(worker_http))

    assert task.exception() is None
    row = await run_db(_row, pk=queued.pk)
    assert (row.status, row.reply_text) == (Status.REPLIED, "done in time")
    assert len(worker_http.sent) == 1


@pytest.mark.asyncio
async def test_stop_after_send_cancels_a_task_that_is_not_sending_at_once() -> None:
    reached = asyncio.Event()

    async def waits_then_sends() -> str:
        await asyncio.sleep(10)
        with sending():
            reached.set()
        return "sent"

    task = asyncio.create_task(waits_then_sends())
    await asyncio.sleep(0)
    stop_after_send(task)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not reached.is_set()


@pytest.mark.asyncio
async def test_stop_after_send_lets_a_sending_task_finish_its_send_then_stops_it() -> None:
    steps: list[str] = []
    in_send = asyncio.Event()

    async def sends_then_goes_on() -> None:
        with sending():
            in_send.set()
            await asyncio.sleep(0.05)
            steps.append("recorded")
        steps.append("next message")

    task = asyncio.create_task(sends_then_goes_on())
    await in_send.wait()
    stop_after_send(task)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["recorded"]
