"""`make bench`: ingest rate, its ceiling, end-to-end latency and memory, in one run.

Everything runs on 127.0.0.1, bounded in count and time:
  1. ceiling: wrk at concurrency 32 for 10 s on GET /health (a trivial JSON view
     served by the same server, same processes, same lean middleware as webhooks);
  2. ingest: wrk at concurrency 32 for 10 s POSTing realistic text deliveries with
     unique ids over 20 tenants (each stored before its 200), then a check that the
     database holds one row per 200;
  3. end to end: 2,000 messages over 20 other tenants whose agent answers after 1 s;
  4. peak RSS of every hub process.
The hub is started with `make run`, as the README says. Results: bench/results.json
and bench/results.md.
"""

import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
FIXTURE = ROOT / "tests" / "fixtures" / "evolution" / "messages-upsert-text.json"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
TENANTS = 20
E2E_MESSAGES = int(os.environ.get("BENCH_MESSAGES", "2000"))
AGENT_DELAY = float(os.environ.get("BENCH_AGENT_DELAY", "1.0"))
DURATION = int(os.environ.get("BENCH_SECONDS", "10"))
CONCURRENCY = 32
IDLE_MESSAGES = 200
HUB_WORKERS = 2
HUB_WORKER_CONCURRENCY = int(os.environ.get("BENCH_WORKER_CONCURRENCY", "512"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up in {timeout:.0f}s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def delivery(*, tenant: str, message_id: str, phone: int) -> dict[str, Any]:
    body = json.loads(FIXTURE.read_text())
    body["instance"] = tenant
    body["data"]["key"].update(id=message_id, remoteJid=f"{phone}@s.whatsapp.net")
    body["data"]["key"].pop("remoteJidAlt", None)
    body["data"]["messageTimestamp"] = int(time.time())
    return body


def create_tenants(env: dict[str, str], agent_url: str, evolution_url: str) -> None:
    # max_concurrent as high as the worker's slots: the bench measures the hub's
    # own overhead, not the per-tenant cap (16 by default, 320 chats for 20 tenants
    # with a 1 s agent).
    code = f"""
from instances.models import InstanceConfig
from instances.services import save_instance
for group, agent in (("ingest", "{agent_url}/fast"), ("e2e", "{agent_url}")):
    for i in range({TENANTS}):
        save_instance(instance=InstanceConfig(
            name=f"{{group}}-{{i}}", evolution_url="{evolution_url}",
            evolution_key=f"evo-key-{{i}}", agent_api_url=agent,
            agent_api_key=f"agent-key-{{i}}", default_agent="bench",
            webhook_token=f"token-{{i}}", max_concurrent={HUB_WORKER_CONCURRENCY}))
"""
    subprocess.run([PYTHON, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    subprocess.run([PYTHON, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, check=True)


def wrk(url: str, script: Path | None) -> dict[str, Any]:
    args = ["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{DURATION}s", "--latency", "-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("JSON "))
    return json.loads(line[5:])


WRK_DONE = """
done = function(summary, latency, requests)
  io.write(string.format(
    'JSON {"requests": %d, "seconds": %.3f, "non2xx": %d, "socket_errors": %d, '
    .. '"p50_ms": %.3f, "p99_ms": %.3f}\\n',
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def ingest_script(prefix: str = "W", per_chat: int = 1) -> Path:
    body = json.dumps(delivery(tenant="TENANT", message_id="MSGID", phone=5500000000000))
    body = body.replace('"MSGID"', '"__ID__"').replace("5500000000000@", "__PHONE__@")
    lua = (
        f"""
local template = [=[{body}]=]
local threads = 0
setup = function(thread) thread:set("tid", threads); threads = threads + 1 end
local counter = 0
request = function()
  counter = counter + 1
  local chat = math.floor((counter - 1) / {per_chat})
  local t = chat % {TENANTS}
  local id = string.format("{prefix}%d-%d", tid, counter)
  local phone = string.format("55%d%09d", tid + 1, chat)
  local b = template:gsub("__ID__", id):gsub("__PHONE__", phone)
  return wrk.format("POST", "/webhook/evolution/ingest-" .. t,
    {{["Content-Type"] = "application/json", ["X-Webhook-Token"] = "token-" .. t}}, b)
end
"""
        + WRK_DONE
    )
    path = OUT / f"ingest-{prefix}.lua"
    path.write_text(lua)
    return path


def ceiling_script() -> Path:
    path = OUT / "ceiling.lua"
    path.write_text(WRK_DONE)
    return path


def e2e_deliveries(prefix: str) -> list[tuple[str, str, bytes]]:
    """The end-to-end messages: (id, path, body), spread over the 20 e2e tenants."""
    out = []
    for n in range(E2E_MESSAGES):
        t, message_id = n % TENANTS, f"{prefix}-{n}"
        body = delivery(tenant=f"e2e-{t}", message_id=message_id, phone=5599000000000 + n)
        path = f"/webhook/evolution/e2e-{t}?token=token-{t}"
        out.append((message_id, path, json.dumps(body).encode()))
    return out


async def send_e2e(hub: str, *, prefix: str, rate: float | None = None) -> dict[str, float]:
    """POST the messages and return each id's send time: with `rate`, one every
    1/rate s whatever the answers (users do not wait for each other); without,
    from 32 senders that each send the next once the last is answered.

    aiohttp, not httpx: the generator shares the 2 cores with the hub, and
    httpx would take about 1 ms of CPU per request from it."""
    deliveries = e2e_deliveries(prefix)
    sent: dict[str, float] = {}
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY if rate is None else 0)
    async with aiohttp.ClientSession(hub, connector=connector) as session:

        async def post(message_id: str, path: str, data: bytes) -> None:
            started = time.time()
            async with session.post(path, data=data, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    sent[message_id] = started

        if rate is None:
            queue = list(reversed(deliveries))

            async def sender() -> None:
                while queue:
                    await post(*queue.pop())

            await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
        else:
            tasks = []
            began = time.monotonic()
            for n, message in enumerate(deliveries):
                await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
                tasks.append(asyncio.create_task(post(*message)))
            await asyncio.gather(*tasks)
    return sent


def send_sequential(
    hub: str, fake_url: str, count: int, prefix: str = "IDLE"
) -> dict[str, float]:
    """POST messages one at a time to an otherwise idle hub; return each id's send time."""
    sent: dict[str, float] = {}
    with httpx.Client(base_url=hub, timeout=30.0) as client:
        for n in range(count):
            t = n % TENANTS
            message_id = f"{prefix}-{n}"
            body = delivery(tenant=f"ingest-{t}", message_id=message_id, phone=5598000000000 + n)
            data = json.dumps(body).encode()
            path = f"/webhook/evolution/ingest-{t}?token=token-{t}"
            started = time.time()
            response = client.post(path, content=data, headers={"content-type": "application/json"})
            if response.status_code == 200:
                sent[message_id] = started
            # The next message once this one's reply is out: nothing else runs meanwhile.
            deadline = time.time() + 10
            while time.time() < deadline:
                replied = httpx.get(f"{fake_url}/_records?sent={message_id}", timeout=10).json()
                if replied:
                    break
                time.sleep(0.005)
    return sent


def overheads(sent: dict[str, float], records: list[Any]) -> tuple[list[float], list[float]]:
    """(webhook sent -> agent request received, agent reply sent -> sendText received), ms."""
    agents = {r[1]: r for r in records if r[0] == "agent" and r[1] in sent}
    sends = {r[1]: r for r in records if r[0] == "send" and r[1] in sent}
    to_agent = [(agents[i][2] - sent[i]) * 1000 for i in sent if i in agents]
    to_send = [(sends[i][2] - agents[i][3]) * 1000 for i in sends if i in agents]
    return to_agent, to_send


def end_to_end(hub: str, fake_url: str, *, prefix: str, rate: float | None) -> dict[str, Any]:
    """Send the e2e messages, wait for every reply, and measure."""
    started = time.time()
    sent = asyncio.run(send_e2e(hub, prefix=prefix, rate=rate))
    deadline = time.time() + 120
    while time.time() < deadline:
        records = httpx.get(f"{fake_url}/_records", timeout=10).json()
        sends = {r[1]: r for r in records if r[0] == "send" and r[1] in sent}
        if len(sends) >= len(sent):
            break
        time.sleep(0.5)
    to_agent, to_send = overheads(sent, records)
    last_reply = max(r[2] for r in sends.values()) if sends else float("nan")
    return {
        "rate": rate,
        "accepted": len(sent),
        "replied": len(sends),
        "first_webhook_to_last_reply_s": round(last_reply - started, 2),
        "last_webhook_to_last_reply_s": round(last_reply - max(sent.values()), 2),
        "overhead_in_p50_ms": round(statistics.median(to_agent), 2),
        "overhead_in_p99_ms": round(percentile(to_agent, 99), 2),
        "overhead_out_p50_ms": round(statistics.median(to_send), 2),
        "overhead_out_p99_ms": round(percentile(to_send, 99), 2),
    }


def hub_processes(group: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != group:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ProcessLookupError):
            continue
        if "python" in cmd and ("uvicorn" in cmd or "multiprocessing" in cmd):
            pids.append(int(entry.name))
    return sorted(pids)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_hub(env: dict[str, str], port: int, log_name: str) -> subprocess.Popen[bytes]:
    """The hub as the README starts it: `make run`."""
    return subprocess.Popen(
        ["make", "--no-print-directory", "run", f"PORT={port}", f"WORKERS={HUB_WORKERS}"],
        cwd=ROOT,
        env=env,
        stdout=(OUT / log_name).open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk (make bench installs it as root)")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    db_path = OUT / "bench.sqlite3"
    hub_port, fake_port = free_port(), free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    env = dict(
        os.environ,
        DATABASE_URL=f"sqlite:///{db_path}",
        WORKER_CONCURRENCY=str(HUB_WORKER_CONCURRENCY),
        PUBLIC_BASE_URL=f"http://127.0.0.1:{hub_port}",
        LOG_LEVEL="WARNING",
    )
    fake_env = dict(env, FAKE_AGENT_DELAY=str(AGENT_DELAY))
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
        env=fake_env,
        start_new_session=True,
    )
    hub = None
    try:
        wait_http(f"{fake_url}/_records")
        create_tenants(env, fake_url, fake_url)
        hub = start_hub(env, hub_port, "hub.log")
        hub_url = f"http://127.0.0.1:{hub_port}"
        wait_http(f"{hub_url}/health", timeout=300)
        wait_http(f"{hub_url}/health/ready", timeout=30)
        print("hub up; measuring the ceiling (GET /health)...", flush=True)
        ceiling = wrk(f"{hub_url}/health", ceiling_script())
        print(f"  {ceiling}", flush=True)
        print("measuring ingest (POST /webhook/evolution/<tenant>)...", flush=True)
        ingest = wrk(hub_url, ingest_script())
        print(f"  {ingest}", flush=True)
        stored = (
            sqlite3.connect(db_path)
            .execute(
                "select count(*) from webhooks_inboundmessage m join instances_instanceconfig i "
                "on i.id = m.instance_id where i.name like 'ingest-%'"
            )
            .fetchone()[0]
        )
        ok_responses = ingest["requests"] - ingest["non2xx"]
        print(f"  stored rows: {stored}, 200 responses counted by wrk: {ok_responses}")
        drain_started = time.time()
        while True:
            left = (
                sqlite3.connect(db_path)
                .execute(
                    "select count(*) from webhooks_inboundmessage where status in "
                    "('queued','processing')"
                )
                .fetchone()[0]
            )
            if not left or time.time() - drain_started > 300:
                break
            time.sleep(0.5)
        drain_seconds = time.time() - drain_started
        print(f"  ingest backlog drained in {drain_seconds:.1f}s ({left} left)", flush=True)
        print(f"end to end: {E2E_MESSAGES} messages, agent delay {AGENT_DELAY}s...", flush=True)
        e2e = end_to_end(hub_url, fake_url, prefix="E2E", rate=None)
        open_rate = round(ingest["requests"] / ingest["seconds"] / 2)
        print(f"end to end again, {open_rate} messages/s (half the ingest rate)...", flush=True)
        paced = end_to_end(hub_url, fake_url, prefix="PACED", rate=open_rate)
        print(f"idle overhead: {IDLE_MESSAGES} messages one at a time...", flush=True)
        idle_sent = send_sequential(hub_url, fake_url, IDLE_MESSAGES)
        records = httpx.get(f"{fake_url}/_records", timeout=10).json()
        idle_to_agent, idle_to_send = overheads(idle_sent, records)
        rss = {pid: round(peak_rss_mb(pid), 1) for pid in hub_processes(os.getpgid(hub.pid))}
        stop(hub)
        print("ingest again, the servers' share: the same hub with its worker off...", flush=True)
        hub = start_hub(dict(env, OMNIHUB_EMBEDDED_WORKER="false"), hub_port, "hub-servers.log")
        wait_http(f"{hub_url}/health", timeout=300)
        servers_only = wrk(hub_url, ingest_script(prefix="S"))
        print(f"  {servers_only}", flush=True)
        servers_only_stored = (
            sqlite3.connect(db_path)
            .execute("select count(*) from webhooks_inboundmessage where message_id like 'S%'")
            .fetchone()[0]
        )
    finally:
        stop(hub)
        stop(fake)
    results = {
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "database": "SQLite (WAL)",
        "hub": f"make run: uvicorn --workers {HUB_WORKERS}, embedded worker, "
        f"WORKER_CONCURRENCY={HUB_WORKER_CONCURRENCY}",
        "ceiling_rps": round(ceiling["requests"] / ceiling["seconds"], 1),
        "ceiling_p50_ms": ceiling["p50_ms"],
        "ceiling_p99_ms": ceiling["p99_ms"],
        "ingest_rps": round(ingest["requests"] / ingest["seconds"], 1),
        "ingest_p50_ms": ingest["p50_ms"],
        "ingest_p99_ms": ingest["p99_ms"],
        "ingest_non2xx": ingest["non2xx"],
        "ingest_socket_errors": ingest["socket_errors"],
        "ingest_stored_rows": stored,
        "ingest_ok_responses": ok_responses,
        "ingest_drain_seconds": round(drain_seconds, 1),
        "servers_only_ingest_rps": round(servers_only["requests"] / servers_only["seconds"], 1),
        "servers_only_ingest_p50_ms": servers_only["p50_ms"],
        "servers_only_ingest_p99_ms": servers_only["p99_ms"],
        "servers_only_ingest_non2xx": servers_only["non2xx"],
        "servers_only_stored_rows": servers_only_stored,
        "servers_only_ok_responses": servers_only["requests"] - servers_only["non2xx"],
        "e2e_messages": E2E_MESSAGES,
        "e2e": e2e,
        "e2e_paced": paced,
        "idle_messages": len(idle_sent),
        "idle_overhead_in_p50_ms": round(statistics.median(idle_to_agent), 2),
        "idle_overhead_in_p99_ms": round(percentile(idle_to_agent, 99), 2),
        "idle_overhead_out_p50_ms": round(statistics.median(idle_to_send), 2),
        "idle_overhead_out_p99_ms": round(percentile(idle_to_send, 99), 2),
        "peak_rss_mb": rss,
    }
    results["ingest_vs_ceiling"] = round(results["ingest_rps"] / results["ceiling_rps"], 3)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render(results)
    (ROOT / "bench" / "results.md").write_text(table)
    print(table)


def e2e_rows(e: dict[str, Any], title: str) -> list[tuple[str, str]]:
    return [
        (
            title,
            f"{e['replied']}/{e['accepted']} replied; first webhook → last reply "
            f"{e['first_webhook_to_last_reply_s']} s; last webhook → last reply "
            f"{e['last_webhook_to_last_reply_s']} s",
        ),
        (
            "  overhead webhook sent → agent request",
            f"p50 {e['overhead_in_p50_ms']} ms, p99 {e['overhead_in_p99_ms']} ms",
        ),
        (
            "  overhead agent reply → sendText",
            f"p50 {e['overhead_out_p50_ms']} ms, p99 {e['overhead_out_p99_ms']} ms",
        ),
    ]


def render(r: dict[str, Any]) -> str:
    rss = ", ".join(f"{v:.0f}" for v in r["peak_rss_mb"].values())
    rows = [
        ("Machine", r["machine"]),
        ("Hub", f"{r['hub']}; {r['database']}; Python {r['python']}"),
        (
            "Ceiling: GET /health, c=32",
            f"{r['ceiling_rps']:.0f} req/s, p50 "
            f"{r['ceiling_p50_ms']:.2f} ms, p99 {r['ceiling_p99_ms']:.2f} ms",
        ),
        (
            "Ingest: POST webhook, c=32, 20 tenants",
            f"{r['ingest_rps']:.0f} webhooks/s "
            f"({r['ingest_vs_ceiling']:.0%} of ceiling), p50 {r['ingest_p50_ms']:.2f} ms, "
            f"p99 {r['ingest_p99_ms']:.2f} ms, non-2xx {r['ingest_non2xx']}",
        ),
        (
            "Ingest, worker off (OMNIHUB_EMBEDDED_WORKER=false: servers whose workers run "
            "elsewhere; rows wait in the queue)",
            f"{r['servers_only_ingest_rps']:.0f} webhooks/s, p50 "
            f"{r['servers_only_ingest_p50_ms']:.2f} ms, "
            f"p99 {r['servers_only_ingest_p99_ms']:.2f} ms, "
            f"non-2xx {r['servers_only_ingest_non2xx']}, {r['servers_only_stored_rows']} rows "
            f"for {r['servers_only_ok_responses']} 200s",
        ),
        (
            "Stored vs 200s",
            f"{r['ingest_stored_rows']} rows / {r['ingest_ok_responses']} "
            f"responses; backlog drained in {r['ingest_drain_seconds']} s",
        ),
        *e2e_rows(r["e2e"], f"End to end: {r['e2e_messages']} msgs, 20 tenants, agent 1 s, "
                  "32 senders as fast as answered"),
        *e2e_rows(r["e2e_paced"], f"End to end: {r['e2e_messages']} msgs at "
                  f"{r['e2e_paced']['rate']}/s (half the ingest rate)"),
        (
            f"Idle hub, {r['idle_messages']} msgs one at a time: webhook sent → agent request",
            f"p50 {r['idle_overhead_in_p50_ms']} ms, p99 {r['idle_overhead_in_p99_ms']} ms",
        ),
        (
            "Idle hub: agent reply → sendText",
            f"p50 {r['idle_overhead_out_p50_ms']} ms, p99 {r['idle_overhead_out_p99_ms']} ms",
        ),
        ("Peak RSS per hub process (MB)", rss),
    ]
    lines = ["| measure | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
