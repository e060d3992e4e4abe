"""`make bench`, the outbox: 5,000 API sends over 20 instances drained at their pace.

The hub as `make run` starts it (2 uvicorn processes, each with its embedded worker
and dispatcher, SQLite), the fake Evolution of bench/fake_servers.py. Each of the 20
bench tenants has send_interval_ms=BENCH_OUTBOX_INTERVAL_MS (default 200, so the run
stays bounded: 250 sends per tenant take at least 50 s). The sends are queued
first, by the same hub with its workers off (OMNIHUB_EMBEDDED_WORKER=false, as
servers whose workers run elsewhere), so that the drain is measured on its own
and not against the 2 cores' share taken by 32 clients posting; then the hub is
started again with its workers and drains them. Every send carries an idempotency
key; 10 % are posted a second time while they drain (by 2 clients). Checked: every message sent
once (the fake's records, by key), none lost (every row `sent`), and each tenant's
sends at least send_interval_ms apart (the hub's clock) and at their pace.
Results: bench/results-outbox.json and bench/results-outbox.md.
"""

import asyncio
import itertools
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import OUT, PYTHON, ROOT, free_port, percentile, start_hub, stop, wait_http

TENANTS = 20
SENDS = int(os.environ.get("BENCH_OUTBOX_SENDS", "5000"))
INTERVAL_MS = int(os.environ.get("BENCH_OUTBOX_INTERVAL_MS", "200"))
REPLAYED = 0.1
API_KEY = "bench-outbox-key"


def create_tenants(env: dict[str, str], evolution_url: str) -> None:
    code = f"""
from instances.models import InstanceConfig
from instances.services import save_instance
for i in range({TENANTS}):
    save_instance(instance=InstanceConfig(
        name=f"outbox-{{i}}", evolution_url="{evolution_url}", evolution_key=f"evo-key-{{i}}",
        agent_api_url="{evolution_url}", agent_api_key="k", default_agent="bench",
        webhook_token=f"token-{{i}}", send_interval_ms={INTERVAL_MS}))
"""
    subprocess.run([PYTHON, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    subprocess.run([PYTHON, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, check=True)


def sends() -> list[tuple[int, str, dict[str, Any]]]:
    """(tenant, key, body): round robin over the tenants, 10 numbers each."""
    out = []
    for n in range(SENDS):
        tenant = n % TENANTS
        key = f"OB-{tenant}-{n}"
        number = f"55119{tenant:03d}{n % 10:05d}"
        out.append((tenant, key, {"to": number, "text": f"outbox {key}", "idempotency_key": key}))
    return out


async def post_all(
    hub: str, items: list[tuple[int, str, dict[str, Any]]], *, clients: int = 32
) -> Counter[int]:
    """POST every send from `clients` senders; the answers' status codes."""
    statuses: Counter[int] = Counter()
    headers = {"x-api-key": API_KEY, "content-type": "application/json"}
    queue = list(reversed(items))
    async with aiohttp.ClientSession(hub, connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def sender() -> None:
            while queue:
                tenant, _key, body = queue.pop()
                path = f"/api/v1/instances/outbox-{tenant}/messages/"
                async with session.post(path, data=json.dumps(body), headers=headers) as answer:
                    await answer.read()
                    statuses[answer.status] += 1

        await asyncio.gather(*(sender() for _ in range(clients)))
    return statuses


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    db_path = OUT / "outbox.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    hub_port, fake_port = free_port(), free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    env = dict(
        os.environ,
        DATABASE_URL=f"sqlite:///{db_path}",
        PUBLIC_BASE_URL=f"http://127.0.0.1:{hub_port}",
        OMNIHUB_API_KEY=API_KEY,
        LOG_LEVEL="WARNING",
    )
    fake = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/uvicorn"),
            "bench.fake_servers:app",
            "--port",
            str(fake_port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--backlog",
            "4096",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    hub = None
    try:
        wait_http(f"{fake_url}/_records")
        create_tenants(env, fake_url)
        hub_url = f"http://127.0.0.1:{hub_port}"
        items = sends()
        replays = random.Random(12).sample(items, int(SENDS * REPLAYED))
        print(
            f"outbox: {SENDS} API sends over {TENANTS} instances, "
            f"send_interval_ms={INTERVAL_MS}, {len(replays)} posted twice...",
            flush=True,
        )
        # Queued by the servers alone: nothing is sent yet.
        hub = start_hub(dict(env, OMNIHUB_EMBEDDED_WORKER="false"), hub_port, "hub-outbox.log")
        wait_http(f"{hub_url}/health", timeout=300)
        started = time.time()
        statuses = asyncio.run(post_all(hub_url, items))
        posted = time.time()
        stop(hub)
        sent_while_queueing = len(httpx.get(f"{fake_url}/_records", timeout=30).json())
        # The same hub with its workers: the drain, with the replays posted meanwhile.
        hub = start_hub(env, hub_port, "hub-outbox-drain.log")
        wait_http(f"{hub_url}/health/ready", timeout=300)
        drain_started = time.time()
        # An integration retrying, not a second flood: 32 clients posting through
        # DRF would take the 2 cores from the dispatchers being measured.
        statuses += asyncio.run(post_all(hub_url, replays, clients=2))
        deadline = time.time() + 600
        while time.time() < deadline:
            left = (
                sqlite3.connect(db_path)
                .execute("select count(*) from webhooks_outboundmessage where status <> 'sent'")
                .fetchone()[0]
            )
            if not left:
                break
            time.sleep(0.2)
        drained = time.time()
        time.sleep(1.0)  # a late duplicate would arrive now
        records = httpx.get(f"{fake_url}/_records", timeout=30).json()
    finally:
        stop(hub)
        stop(fake)
    seen = Counter(r[1] for r in records if r[0] == "send")
    keys = {key for _, key, _ in items}
    by_tenant: dict[int, list[float]] = defaultdict(list)
    for kind, key, t_in, _ in records:
        if kind == "send" and key in keys:
            by_tenant[int(key.split("-")[1])].append(t_in)
    gaps = []
    rates = []
    for times in by_tenant.values():
        times.sort()
        gaps += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    # The same on the hub's clock: when each send was marked `sending`, just before
    # its call (what the pacing holds to; the fake's arrival adds each call's latency).
    marked: dict[int, list[datetime]] = defaultdict(list)
    for instance_id, at in sqlite3.connect(db_path).execute(
        "select instance_id, attempt_started_at from webhooks_outboundmessage"
    ):
        marked[instance_id].append(datetime.fromisoformat(at))
    hub_gaps = []
    for times in marked.values():
        times.sort()
        hub_gaps += [(b - a).total_seconds() * 1000 for a, b in itertools.pairwise(times)]
    stored = (
        sqlite3.connect(db_path)
        .execute("select status, count(*) from webhooks_outboundmessage group by status")
        .fetchall()
    )
    results = {
        "sends": SENDS,
        "tenants": TENANTS,
        "send_interval_ms": INTERVAL_MS,
        "replayed": len(replays),
        "answers": dict(statuses),
        "rows": dict(stored),
        "sent_once": sum(1 for key in keys if seen.get(key) == 1),
        "duplicates": sum(count - 1 for key, count in seen.items() if key in keys and count > 1),
        "lost": sum(1 for key in keys if key not in seen),
        "post_seconds": round(posted - started, 1),
        "sent_while_queueing": sent_while_queueing,
        "drain_seconds": round(drained - drain_started, 1),
        "pace_floor_s": round(SENDS / TENANTS * INTERVAL_MS / 1000, 1),
        # The jitter's mean is 1.2 times the interval.
        "pace_expected_s": round(SENDS / TENANTS * INTERVAL_MS * 1.2 / 1000, 1),
        "hub_gap_min_ms": round(min(hub_gaps), 1),
        "hub_gap_p50_ms": round(statistics.median(hub_gaps), 1),
        "gap_min_ms": round(min(gaps), 1),
        "gap_p50_ms": round(statistics.median(gaps), 1),
        "gap_p99_ms": round(percentile(gaps, 99), 1),
        "rate_per_tenant_min": round(min(rates), 1),
        "rate_per_tenant_max": round(max(rates), 1),
        "rate_per_tenant_p50": round(statistics.median(rates), 2),
        "total_rate": round(SENDS / (drained - drain_started), 1),
    }
    (ROOT / "bench" / "results-outbox.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render(results)
    (ROOT / "bench" / "results-outbox.md").write_text(table)
    print(table)
    if results["duplicates"] or results["lost"]:
        raise SystemExit("the outbox sent a message twice or lost one")


def render(r: dict[str, Any]) -> str:
    rows = [
        (
            "Sends",
            f"{r['sends']} API sends over {r['tenants']} instances "
            f"(send_interval_ms={r['send_interval_ms']}), {r['replayed']} posted twice "
            f"with the same idempotency key",
        ),
        ("Answers", ", ".join(f"{k}: {v}" for k, v in sorted(r["answers"].items()))),
        ("Sent once / duplicates / lost", f"{r['sent_once']} / {r['duplicates']} / {r['lost']}"),
        ("Rows", ", ".join(f"{k}: {v}" for k, v in sorted(r["rows"].items()))),
        (
            "Queueing (the hub's workers off)",
            f"{r['post_seconds']} s for {r['sends']} POSTs; sent meanwhile: "
            f"{r['sent_while_queueing']}",
        ),
        (
            "Drained (hub with workers ready → last sent)",
            f"{r['drain_seconds']} s; the pace alone: at least {r['pace_floor_s']} s, "
            f"{r['pace_expected_s']} s with the jitter's mean",
        ),
        (
            "Gap between one instance's sends, hub's clock (marked sending)",
            f"min {r['hub_gap_min_ms']} ms, p50 {r['hub_gap_p50_ms']} ms",
        ),
        (
            "Gap between one instance's sends (fake's arrival clock)",
            f"min {r['gap_min_ms']} ms, p50 {r['gap_p50_ms']} ms, p99 {r['gap_p99_ms']} ms",
        ),
        (
            "Rate per instance",
            f"{r['rate_per_tenant_min']}-{r['rate_per_tenant_max']} sends/s, "
            f"p50 {r['rate_per_tenant_p50']} "
            f"(configured: at most {1000 / r['send_interval_ms']:.0f}/s, "
            f"{1000 / r['send_interval_ms'] / 1.2:.1f}/s with the jitter's mean)",
        ),
        ("All instances", f"{r['total_rate']} sends/s"),
    ]
    lines = ["| measure | result |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
