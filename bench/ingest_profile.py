"""In-process cost of storing and processing messages, without HTTP: ms and SQL
statements per delivery and per processed message.

Ingest: N deliveries go through the function the webhook view calls
(`webhooks.ingest.accept_delivery`) in group-commit batches, as the database
thread runs them (`webhooks.db._execute`: one lock, one transaction per
batch). Worker: the stored messages are then claimed and answered by the
worker's own code, through `run_db` with group commit on, the agent and
Evolution answered at once by an httpx.MockTransport.

Run from the root of the checkout to measure (it imports the code found there),
so that older commits can be measured with the same script:

    .venv/bin/python bench/ingest_profile.py                       # SQLite file
    .venv/bin/python bench/ingest_profile.py --db postgres://postgres@127.0.0.1:5432/omnihub_prof
    cd /tmp/old && .venv/bin/python /path/to/bench/ingest_profile.py --per-chat 2
Options: -n deliveries, --batch calls per transaction, --per-chat messages per
chat in a row, --claim (the view's claim on insert, SQLite), --profile (cProfile
of the ingest), --statements (each kind of statement with its count);
PROFILE_LOOP=1 prints a cProfile of the worker phase, PROFILE_LOOP_FILE=path keeps it
for pstats (print_callers).
"""

import argparse
import asyncio
import cProfile
import functools
import inspect
import json
import os
import pstats
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))
TENANTS = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default="sqlite", help="sqlite, or a postgres:// URL (recreated)")
    parser.add_argument("-n", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-chat", type=int, default=1)
    parser.add_argument("--claim", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--statements", action="store_true")
    parser.add_argument("--no-worker", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="ingest rounds (best is shown)")
    return parser.parse_args()


def setup(db: str) -> None:
    if db == "sqlite":
        path = Path(tempfile.mkdtemp(prefix="omnihub-prof-")) / "prof.sqlite3"
        os.environ["DATABASE_URL"] = f"sqlite:///{path}"
    else:
        import psycopg

        base, name = db.rsplit("/", 1)
        with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            admin.execute(f'CREATE DATABASE "{name}"')
        os.environ["DATABASE_URL"] = db
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omnihub.settings")
    os.environ["DB_GROUP_COMMIT"] = "true"
    os.environ["LOG_LEVEL"] = "WARNING"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    import logging

    logging.disable(logging.INFO)


def create_tenants() -> None:
    from instances.models import InstanceConfig
    from instances.services import save_instance

    names = {f.name for f in InstanceConfig._meta.get_fields()}
    for i in range(TENANTS):
        extra = {"max_concurrent": 512} if "max_concurrent" in names else {}
        save_instance(
            instance=InstanceConfig(
                name=f"ingest-{i}",
                evolution_url="http://127.0.0.1:9",
                evolution_key=f"evo-key-{i}",
                agent_api_url="http://127.0.0.1:9/fast",
                agent_api_key=f"agent-key-{i}",
                default_agent="bench",
                webhook_token=f"token-{i}",
                **extra,
            )
        )


def deliveries(*, n: int, per_chat: int, prefix: str, first_chat: int) -> list[tuple[int, bytes]]:
    template = json.loads((ROOT / "tests/fixtures/evolution/messages-upsert-text.json").read_text())
    out = []
    for k in range(n):
        chat = first_chat + k // per_chat
        t = chat % TENANTS
        body = json.loads(json.dumps(template))
        body["instance"] = f"ingest-{t}"
        body["data"]["key"].update(id=f"{prefix}{k}", remoteJid=f"55{chat:011d}@s.whatsapp.net")
        body["data"]["key"].pop("remoteJidAlt", None)
        body["data"]["messageTimestamp"] = int(time.time())
        out.append((t, json.dumps(body).encode()))
    return out


class Statements:
    """Counts every statement run through Django's cursors (all threads)."""

    def __init__(self, *, count: bool) -> None:
        self.kinds: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        if not count:
            return
        from django.db.backends import utils

        original = utils.CursorWrapper._execute
        counter = self

        def counted(self: Any, sql: str, params: Any, *ignored: Any) -> Any:
            kind = _kind(sql)
            counter.kinds[kind] += 1
            started = time.perf_counter()
            try:
                return original(self, sql, params, *ignored)
            finally:
                counter.seconds[kind] += time.perf_counter() - started

        utils.CursorWrapper._execute = counted
        try:
            from webhooks import statements
        except ImportError:
            return
        # The hot path's statements skip Django's cursor on SQLite (webhooks/statements.py).
        run = statements.run

        def counted_run(sql: str, params: Any) -> Any:
            if connection_watched():
                return run(sql, params)
            kind = _kind(sql)
            counter.kinds[kind] += 1
            started = time.perf_counter()
            try:
                return run(sql, params)
            finally:
                counter.seconds[kind] += time.perf_counter() - started

        statements.run = counted_run

    def take(self) -> Counter[str]:
        kinds, self.kinds = self.kinds, Counter()
        self.last_seconds, self.seconds = self.seconds, Counter()
        return kinds


def connection_watched() -> bool:
    """Whether statements.run goes through Django's cursor (counted there)."""
    from django.db import connection

    return connection.vendor != "sqlite" or connection.queries_logged


@functools.lru_cache(maxsize=1024)
def _kind(sql: str) -> str:
    sql = re.sub(r"\s+", " ", sql.strip())
    words = sql.split(" ")
    verb = words[0].upper()
    table = ""
    for key in ("INTO", "UPDATE", "FROM"):
        if key in (w.upper() for w in words):
            idx = [w.upper() for w in words].index(key)
            table = words[idx + 1].strip('"') if idx + 1 < len(words) else ""
            break
    if verb == "UPDATE":
        table = words[1].strip('"')
    return f"{verb} {table}".strip()


def ingest(args: argparse.Namespace, stmts: Statements, round_: int) -> dict[str, Any]:
    from webhooks import db, ingest

    params = inspect.signature(ingest.accept_delivery).parameters
    raw_inside = "raw" in params
    # Each round its own chats: none is held by the previous round's claims.
    first_chat = round_ * args.n
    items = deliveries(
        n=args.n, per_chat=args.per_chat, prefix=f"P{round_}-", first_chat=first_chat
    )
    calls: list[tuple[Any, dict[str, Any]]] = []
    parse = 0.0
    for t, raw in items:
        kwargs: dict[str, Any] = {"segment": f"ingest-{t}", "event": None, "token": f"token-{t}"}
        if raw_inside:
            # Parsed on the database thread, in the call (as the view does).
            kwargs["raw"] = raw
        else:
            # Parsed by the view on the event loop, before the database call.
            started = time.perf_counter()
            kwargs["delivery"] = ingest.read_delivery(raw)
            parse += time.perf_counter() - started
        if args.claim:
            kwargs["claim"] = True
        calls.append((ingest.accept_delivery, kwargs))
    profiler = cProfile.Profile() if args.profile else None
    # The part under the write lock (webhooks.db._execute_locked where it exists).
    locked_name = "_execute_locked" if hasattr(db, "_execute_locked") else "_execute"
    run_locked = getattr(db, locked_name)
    under_lock: list[float] = []

    def timed_locked(batch: Any) -> Any:
        started = time.thread_time()
        try:
            return run_locked(batch)
        finally:
            under_lock.append(time.thread_time() - started)

    setattr(db, locked_name, timed_locked)
    stmts.take()
    started = time.perf_counter()
    cpu = time.thread_time()
    outcomes = []
    if profiler:
        profiler.enable()
    for i in range(0, len(calls), args.batch):
        outcomes.extend(db._execute(calls[i : i + args.batch]))
    if profiler:
        profiler.disable()
        if os.environ.get("PROFILE_INGEST_FILE"):
            profiler.dump_stats(os.environ["PROFILE_INGEST_FILE"])
    elapsed = time.perf_counter() - started
    cpu = time.thread_time() - cpu
    setattr(db, locked_name, run_locked)
    kinds = stmts.take()
    failed = [value for ok, value in outcomes if not ok]
    if failed:
        raise SystemExit(f"{len(failed)} deliveries failed: {failed[0]!r}")
    statuses = Counter(str(value.outcome) for _, value in outcomes)
    claimed = [getattr(value, "claimed", None) for _, value in outcomes]
    if profiler:
        sort = os.environ.get("PROFILE_SORT", "tottime")
        pstats.Stats(profiler).sort_stats(sort).print_stats(
            os.environ.get("PROFILE_FILTER", ""), 40
        )
    return {
        "ms_per_delivery": 1000 * elapsed / len(calls),
        "cpu_ms_per_delivery": 1000 * cpu / len(calls),
        "locked_cpu_ms": 1000 * sum(under_lock) / len(calls),
        "parse_ms_outside": 1000 * parse / len(calls),
        "statements": sum(kinds.values()) / len(calls),
        "kinds": kinds,
        "seconds": stmts.last_seconds,
        "outcomes": statuses,
        "claimed": [c for c in claimed if c is not None],
    }


def mock_http() -> Any:
    import httpx

    count = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal count
        if "/agent/" in request.url.path:
            return httpx.Response(200, json={"message": "ok"})
        if "/sendText/" in request.url.path:
            count += 1
            return httpx.Response(201, json={"key": {"id": f"3EB0{count:018d}"}})
        return httpx.Response(201, json={})

    # The worker's own client class where the code has one (instances/clients/http.py).
    try:
        from instances.clients.http import CookielessClient as client_class
    except ImportError:
        client_class = httpx.AsyncClient
    return client_class(transport=httpx.MockTransport(handle))


async def work(claimed: list[Any]) -> int:
    """Claim and answer every queued message, as the worker does (no claim on insert)."""
    from webhooks import processing, worker

    old = hasattr(processing, "process_message")
    handled = 0
    async with mock_http() as http:

        async def one(item: Any) -> None:
            if old:
                await processing.process_message(message=item, http=http)
            else:
                await processing.handle_batch(batch=item, http=http)

        pending = list(claimed)
        while True:
            if pending:
                await asyncio.gather(*(one(item) for item in pending))
                handled += len(pending)
            if old:
                pending = await worker.run_db(worker.claim_due_messages, limit=64)
            else:
                from webhooks.transitions import claim_conversations

                pending = await worker.run_db(claim_conversations, limit=64)
            if not pending:
                return handled


def worker_phase(
    stmts: Statements, *, stored: int, claimed: list[Any], timing: list[float]
) -> dict[str, Any]:
    from django.db import connection

    from webhooks import db
    from webhooks.models import InboundMessage

    stmts.take()
    timing.clear()
    started = time.perf_counter()
    cpu = time.process_time()
    loop_profile = cProfile.Profile() if os.environ.get("PROFILE_LOOP") else None
    if loop_profile:
        loop_profile.enable()
    asyncio.run(work(claimed))
    if loop_profile:
        loop_profile.disable()
        pstats.Stats(loop_profile).sort_stats("tottime").print_stats(30)
        if os.environ.get("PROFILE_LOOP_FILE"):
            loop_profile.dump_stats(os.environ["PROFILE_LOOP_FILE"])
    cpu = time.process_time() - cpu
    elapsed = time.perf_counter() - started
    db.close_database_threads()
    kinds = stmts.take()
    replied = InboundMessage.objects.filter(status="replied").count()
    connection.close()
    return {
        "replied": replied,
        "stored": stored,
        "ms_per_message_wall": 1000 * elapsed / max(stored, 1),
        "process_cpu": 1000 * cpu / max(stored, 1),
        "ms_per_message_db": 1000 * sum(timing) / max(stored, 1),
        "statements": sum(kinds.values()) / max(stored, 1),
        "kinds": kinds,
        "seconds": stmts.last_seconds,
    }


def main() -> None:
    args = parse_args()
    setup(args.db)
    create_tenants()
    from django.db import connection

    from webhooks import db

    # Time spent by the database thread in its batches (the serialized part).
    timing: list[float] = []
    run = db._execute

    worker_profile = cProfile.Profile() if args.profile else None

    cpu_timing: list[float] = []

    def timed(calls: Any) -> Any:
        started = time.perf_counter()
        cpu = time.thread_time()
        if worker_profile:
            worker_profile.enable()
        try:
            return run(calls)
        finally:
            if worker_profile:
                worker_profile.disable()
            timing.append(time.perf_counter() - started)
            cpu_timing.append(time.thread_time() - cpu)

    stmts = Statements(count=args.statements)
    rounds = []
    for r in range(args.repeat):
        rounds.append(ingest(args, stmts, round_=r))
    best = min(rounds, key=lambda x: x["ms_per_delivery"])
    print(
        f"code={ROOT.name} db={connection.vendor} n={args.n} batch={args.batch} "
        f"per_chat={args.per_chat} claim={args.claim}"
    )
    print(
        "ingest: ms/delivery "
        + " ".join(f"{x['ms_per_delivery']:.3f}" for x in rounds)
        + f" (best {best['ms_per_delivery']:.3f}); cpu "
        + " ".join(f"{x['cpu_ms_per_delivery']:.3f}" for x in rounds)
        + "; of it under the lock "
        + " ".join(f"{x['locked_cpu_ms']:.3f}" for x in rounds)
        + f"; parse outside the database call "
        f"{best['parse_ms_outside']:.3f} ms; statements/delivery {best['statements']:.2f}; "
        f"outcomes {dict(best['outcomes'])}"
    )
    if args.statements:
        for kind, count in best["kinds"].most_common():
            ms = 1000 * best["seconds"][kind] / args.n
            print(f"    {count / args.n:6.2f}  {ms:6.3f} ms  {kind}")
    if args.no_worker:
        return
    connection.close()
    db._execute = timed
    stored = args.n * args.repeat
    claimed = [batch for x in rounds for batch in x["claimed"]]
    cpu_timing.clear()
    result = worker_phase(stmts, stored=stored, claimed=claimed, timing=timing)
    result["cpu"] = 1000 * sum(cpu_timing) / stored
    print(
        f"worker: {result['replied']}/{stored} replied; ms/message wall "
        f"{result['ms_per_message_wall']:.3f}, database thread {result['ms_per_message_db']:.3f} "
        f"(cpu {result['cpu']:.3f}); process cpu {result['process_cpu']:.3f}; "
        f"statements/message {result['statements']:.2f}"
    )
    if args.statements:
        for kind, count in result["kinds"].most_common():
            ms = 1000 * result["seconds"][kind] / stored
            print(f"    {count / stored:6.2f}  {ms:6.3f} ms  {kind}")
    if worker_profile:
        sort = os.environ.get("PROFILE_SORT", "tottime")
        pstats.Stats(worker_profile).sort_stats(sort).print_stats(
            os.environ.get("PROFILE_FILTER", ""), 40
        )


if __name__ == "__main__":
    main()
