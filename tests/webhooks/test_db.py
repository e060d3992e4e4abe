"""The database thread's batches: many calls, one transaction, each caller its own outcome."""

import asyncio

import pytest
from django.db import IntegrityError

from instances.models import InstanceConfig
from tests.webhooks.conftest import queue_message
from webhooks import db
from webhooks.models import InboundMessage, Status, WorkerHeartbeat
from webhooks.rows import update_claimed_row

pytestmark = pytest.mark.django_db(transaction=True)


def add_heartbeat(*, worker_id: str) -> str:
    WorkerHeartbeat.objects.create(
        worker_id=worker_id, hostname="h", pid=1, started_at="2026-01-01T00:00:00Z",
        last_seen_at="2026-01-01T00:00:00Z",
    )
    return worker_id


def add_duplicate_heartbeat(*, worker_id: str) -> None:
    add_heartbeat(worker_id=worker_id)
    add_heartbeat(worker_id=worker_id)


def explode() -> None:
    raise RuntimeError("a bug in one call")


def test_a_batch_returns_every_call_s_result_in_order() -> None:
    outcomes = db._execute([(add_heartbeat, {"worker_id": f"w{n}"}) for n in range(3)])

    assert outcomes == [(True, "w0"), (True, "w1"), (True, "w2")]
    assert sorted(WorkerHeartbeat.objects.values_list("worker_id", flat=True)) == [
        "w0", "w1", "w2",
    ]


@pytest.mark.parametrize("failing", [add_duplicate_heartbeat, explode])
def test_one_failing_call_fails_alone_and_the_others_are_stored(failing) -> None:
    kwargs = {"worker_id": "twice"} if failing is add_duplicate_heartbeat else {}

    outcomes = db._execute(
        [(add_heartbeat, {"worker_id": "before"}), (failing, kwargs),
         (add_heartbeat, {"worker_id": "after"})]
    )

    assert outcomes[0] == (True, "before")
    assert outcomes[2] == (True, "after")
    ok, error = outcomes[1]
    assert not ok
    assert isinstance(error, IntegrityError | RuntimeError)
    # The failed call left nothing behind, not even its first insert.
    assert sorted(WorkerHeartbeat.objects.values_list("worker_id", flat=True)) == [
        "after", "before",
    ]


def test_a_lone_failing_call_leaves_nothing_and_the_next_call_works() -> None:
    [(ok, error)] = db._execute([(add_duplicate_heartbeat, {"worker_id": "x"})])
    [(ok_next, value)] = db._execute([(add_heartbeat, {"worker_id": "y"})])

    assert not ok and isinstance(error, IntegrityError)
    assert (ok_next, value) == (True, "y")
    assert list(WorkerHeartbeat.objects.values_list("worker_id", flat=True)) == ["y"]


def test_run_db_hands_each_caller_its_own_result(settings) -> None:
    settings.DB_GROUP_COMMIT = True

    async def main() -> list[object]:
        calls = [db.run_db(add_heartbeat, worker_id=f"c{n}") for n in range(20)]
        calls.append(db.run_db(explode))
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())

    assert results[:20] == [f"c{n}" for n in range(20)]
    assert isinstance(results[20], RuntimeError)
    assert WorkerHeartbeat.objects.count() == 20
    assert not InstanceConfig.objects.exists()


def test_a_batch_run_again_still_makes_every_worker_write(make_instance) -> None:
    """A batch that fails runs again: a write conditional on the claim token must
    still match then (the call must not have changed its own arguments)."""
    row = queue_message(make_instance(), status=Status.PROCESSING, claim_token="tok")
    finish = {"status": Status.REPLIED, "claim_token": "", "lease_until": None}

    outcomes = db._execute(
        [(update_claimed_row, {"pk": row.pk, "claim_token": "tok", "fields": finish}),
         (explode, {})]
    )

    assert outcomes[0] == (True, True)
    row.refresh_from_db()
    assert (row.status, row.claim_token) == (Status.REPLIED, "")
    assert InboundMessage.objects.count() == 1


def test_calls_made_while_the_thread_is_busy_go_together_as_the_next_batch(
    settings, monkeypatch
) -> None:
    settings.DB_GROUP_COMMIT = True
    sizes: list[int] = []
    execute = db._execute

    def counted(calls: db.Calls) -> list[tuple[bool, object]]:
        sizes.append(len(calls))
        return execute(calls)

    monkeypatch.setattr(db, "_execute", counted)

    async def main() -> list[object]:
        # The first goes to the idle thread at once; the next 20 wait for it.
        calls = [db.run_db(add_heartbeat, worker_id=f"b{n}") for n in range(21)]
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    db.close_database_threads()

    assert results == [f"b{n}" for n in range(21)]
    assert sizes == [1, 20]


def test_a_caller_cancelled_while_its_call_runs_leaves_the_call_done_and_the_thread_working(
    settings,
) -> None:
    settings.DB_GROUP_COMMIT = True

    async def main() -> str:
        first = asyncio.ensure_future(db.run_db(add_heartbeat, worker_id="cancelled"))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        return await db.run_db(add_heartbeat, worker_id="next")

    assert asyncio.run(main()) == "next"
    db.close_database_threads()
    assert set(WorkerHeartbeat.objects.values_list("worker_id", flat=True)) == {"cancelled", "next"}
