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
from webhooks import worker
from webhooks.db import run_db
from webhooks.models import InboundMessage, Status, WorkerHeartbeat
from webhooks.worker import MAX_CLAIMS, Worker, claim_due_messages, release

CHAT_A = "5511911110001"
CHAT_B = "5511922220002"


def queue_in_chat(instance: InstanceConfig, phone: str, message_id: str, **fields: Any):
    return queue_message(instance, message_body(message_id=message_id, phone=phone), **fields)


def claimed_ids(limit: int = 10) -> list[str]:
    return [message.message_id for message in claim_due_messages(limit=limit)]


# --- claim_due_messages -------------------------------------------------------


@pytest.mark.django_db
def test_only_the_oldest_open_message_of_a_chat_is_claimable(make_instance) -> None:
    acme = make_instance()
    first = queue_in_chat(acme, CHAT_A, "A1")
    queue_in_chat(acme, CHAT_A, "A2")
    queue_in_chat(acme, CHAT_B, "B1")

    assert claimed_ids() == ["A1", "B1"]
    assert claimed_ids() == []

    InboundMessage.objects.filter(pk=first.pk).update(status=Status.REPLIED)
    assert claimed_ids() == ["A2"]


@pytest.mark.django_db
def test_a_message_waiting_for_a_retry_holds_back_the_rest_of_its_chat(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(acme, CHAT_A, "A1", next_attempt_at=timezone.now() + timedelta(minutes=1))
    queue_in_chat(acme, CHAT_A, "A2")

    assert claimed_ids() == []


@pytest.mark.django_db
def test_chats_of_different_instances_are_independent(make_instance) -> None:
    acme = make_instance()
    other = make_instance(name="other")
    queue_in_chat(acme, CHAT_A, "A1")
    queue_in_chat(other, CHAT_A, "A1")

    assert [m.instance.name for m in claim_due_messages(limit=10)] == ["acme", "other"]


@pytest.mark.django_db
def test_finished_messages_do_not_hold_back_their_chat(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(acme, CHAT_A, "A1", status=Status.FAILED)
    queue_in_chat(acme, CHAT_A, "A2", status=Status.IGNORED)
    queue_in_chat(acme, CHAT_A, "A3")

    assert claimed_ids() == ["A3"]


@pytest.mark.django_db
def test_it_skips_messages_due_later(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(acme, CHAT_A, "A1", next_attempt_at=timezone.now() + timedelta(seconds=30))
    queue_in_chat(acme, CHAT_B, "B1", next_attempt_at=seconds_ago(1))

    assert claimed_ids() == ["B1"]


@pytest.mark.django_db
def test_it_reclaims_a_message_whose_lease_expired(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(
        acme,
        CHAT_A,
        "A1",
        status=Status.PROCESSING,
        claim_token="dead-worker",
        lease_until=seconds_ago(1),
        attempts=1,
    )
    queue_in_chat(
        acme,
        CHAT_B,
        "B1",
        status=Status.PROCESSING,
        claim_token="live-worker",
        lease_until=timezone.now() + timedelta(seconds=30),
        attempts=1,
    )

    [message] = claim_due_messages(limit=10)

    assert message.message_id == "A1"
    assert message.claim_token not in ("", "dead-worker")
    assert message.attempts == 2
    live = InboundMessage.objects.get(message_id="B1")
    assert (live.claim_token, live.attempts) == ("live-worker", 1)


@pytest.mark.django_db
def test_it_claims_at_most_limit_messages_oldest_first(make_instance) -> None:
    acme = make_instance()
    for n in range(5):
        queue_in_chat(acme, f"55119000000{n:02d}", f"M{n}")

    assert claimed_ids(limit=2) == ["M0", "M1"]
    assert claimed_ids(limit=2) == ["M2", "M3"]
    assert claimed_ids(limit=2) == ["M4"]
    assert claimed_ids(limit=2) == []


@pytest.mark.django_db
def test_each_claim_marks_its_rows_with_a_token_a_lease_and_an_attempt(make_instance) -> None:
    fast = make_instance(agent_timeout=5)
    slow = make_instance(name="slow", agent_timeout=120)
    queue_in_chat(fast, CHAT_A, "F1")
    queue_in_chat(slow, CHAT_A, "S1")
    before = timezone.now()

    first, second = claim_due_messages(limit=10)

    assert re.fullmatch(r"[0-9a-f]{32}", first.claim_token)
    assert first.claim_token == second.claim_token
    for message in (first, second):
        assert message.status == Status.PROCESSING
        assert message.attempts == 1
        margin = django_settings.EVOLUTION_TIMEOUT + django_settings.WORKER_LEASE_MARGIN
        expected = before + timedelta(seconds=message.instance.agent_timeout + margin)
        assert expected <= message.lease_until <= expected + timedelta(seconds=5)
    stored = InboundMessage.objects.get(pk=first.pk)
    assert (stored.status, stored.claim_token) == (Status.PROCESSING, first.claim_token)


@pytest.mark.django_db
def test_two_claims_get_different_tokens(make_instance) -> None:
    acme = make_instance()
    queue_in_chat(acme, CHAT_A, "A1")
    [first] = claim_due_messages(limit=10)
    queue_in_chat(acme, CHAT_B, "B1")

    [second] = claim_due_messages(limit=10)

    assert first.claim_token != second.claim_token


@pytest.mark.django_db
def test_release_gives_a_row_back_to_the_queue(make_instance) -> None:
    queue_in_chat(make_instance(), CHAT_A, "A1")
    [message] = claim_due_messages(limit=10)

    release(message=message, error="boom", delay=30.0)

    row = InboundMessage.objects.get(pk=message.pk)
    assert (row.status, row.claim_token, row.lease_until) == (Status.QUEUED, "", None)
    assert row.last_error == "boom"
    assert row.next_attempt_at > timezone.now() + timedelta(seconds=25)


@pytest.mark.django_db
def test_release_fails_a_row_claimed_too_often(make_instance) -> None:
    queue_in_chat(make_instance(), CHAT_A, "A1", attempts=MAX_CLAIMS - 1)
    [message] = claim_due_messages(limit=10)

    release(message=message)

    row = InboundMessage.objects.get(pk=message.pk)
    assert row.status == Status.FAILED
    assert row.finished_at is not None


@pytest.mark.django_db
def test_release_leaves_a_row_another_worker_claimed(make_instance) -> None:
    queue_in_chat(make_instance(), CHAT_A, "A1")
    [message] = claim_due_messages(limit=10)
    InboundMessage.objects.filter(pk=message.pk).update(claim_token="other-worker")

    release(message=message)

    assert InboundMessage.objects.get(pk=message.pk).claim_token == "other-worker"


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
    assert not worker._wake_events
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
        worker.wake_up()
        await eventually(lambda: all_replied(1), timeout=3)

    assert len(worker_http.sent) == 1


async def _worker_registered() -> bool:
    return bool(worker._wake_events)


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

    monkeypatch.setattr(worker, "process_message", crash)
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
