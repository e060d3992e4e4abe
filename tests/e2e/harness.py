"""The hub as real processes: uvicorn servers and run_worker workers on one database.

Used by the end-to-end tests and reusable by a benchmark script:

    hub = Hub(database_url="postgres://postgres@127.0.0.1:5432/bench",
              env={"WORKER_CONCURRENCY": "64"}, fast=False)
    hub.migrate()
    hub.start(servers=2, workers=1)        # N servers, M standalone workers
    hub.create_instance(name="acme", evolution_url=..., ...)   # REST API
    hub.server.post_webhook("/webhook/evolution/acme", text_delivery(...), token=...)
    hub.query("SELECT status, COUNT(*) FROM webhooks_inboundmessage GROUP BY status")
    hub.stop()

Every process gets the same environment: the caller's `env` over FAST_ENV (unless
fast=False) over the basics (no .env file, plain static files storage, the API key).
The database defaults to a SQLite file in the hub's work directory, next to the
processes' logs. For PostgreSQL, `PostgresDatabases` makes throwaway databases
(copies of one migrated template) and drops them at the end:

    databases = PostgresDatabases("postgres://postgres@127.0.0.1:5432/postgres")
    hub = Hub(database_url=databases.create(template=databases.migrated_template()))
    ...
    databases.drop_all()
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

if TYPE_CHECKING:
    import psycopg

PROJECT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
API_KEY = "e2e-api-key"

BASE_ENV = {
    "DJANGO_SETTINGS_MODULE": "omnihub.settings",
    "ENV_FILE": "",
    "SECRET_KEY": "x",
    "STATICFILES_STORAGE": "django.contrib.staticfiles.storage.StaticFilesStorage",
    # Serve the admin's CSS straight from the apps: a clean clone has no collectstatic.
    "WHITENOISE_USE_FINDERS": "true",
    "OMNIHUB_API_KEY": API_KEY,
    # Tenant secrets encrypted at rest, as on a `make run` install.
    "OMNIHUB_ENCRYPTION_KEY": "ZTJlLWtleS1ub3QtZm9yLXByb2R1Y3Rpb24tMzJieXQ=",
    "PYTHONUNBUFFERED": "1",
}
# Retries and leases in fractions of a second, so failure tests finish quickly.
FAST_ENV = {
    "RETRY_BASE_DELAY": "0.2",
    "RETRY_MAX_DELAY": "1",
    "WORKER_POLL_INTERVAL": "0.2",
    "EVOLUTION_TIMEOUT": "3",
    "WORKER_LEASE_MARGIN": "1",
    "WORKER_SHUTDOWN_GRACE": "2",
}
# Variables of the caller's shell that would change what the subprocesses run.
SCRUBBED = ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "OMNIHUB_EMBEDDED_WORKER")

T = TypeVar("T")


class HubError(RuntimeError):
    """A hub process failed to start or a management command failed."""


def wait_until(
    probe: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> T:
    """Call `probe` until it returns something truthy; raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or probe}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sqlite_url(path: Path | str) -> str:
    return f"sqlite:///{Path(path).resolve()}"


POSTGRES_SCHEMES = ("postgres", "postgresql", "pgsql")


def is_postgres(url: str | None) -> bool:
    return bool(url) and urlsplit(url).scheme in POSTGRES_SCHEMES


def with_database(url: str, name: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def pg_connect(url: str, **kwargs: Any) -> "psycopg.Connection[Any]":
    """A psycopg connection for a Django-style URL (django-environ's schemes)."""
    import psycopg

    parts = urlsplit(url)
    return psycopg.connect(urlunsplit(("postgresql", *parts[1:])), **kwargs)


def postgres_unreachable(url: str) -> str:
    """Why the server of `url` cannot be used ("" when it can)."""
    try:
        pg_connect(with_database(url, "postgres"), connect_timeout=3).close()
    except Exception as exc:
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return ""


class PostgresDatabases:
    """Throwaway databases on one PostgreSQL server, dropped by drop_all().

    Migrating takes seconds; `CREATE DATABASE ... TEMPLATE` of a migrated
    database takes a fraction of one, so hubs copy one template.
    """

    def __init__(self, server_url: str, *, prefix: str = "omnihub_e2e") -> None:
        self.server_url = server_url
        self.prefix = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = []
        self._template: str | None = None
        self._count = 0

    def _admin(self, sql: str) -> None:
        # CREATE/DROP/ALTER DATABASE refuse to run inside a transaction.
        with pg_connect(with_database(self.server_url, "postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def create(self, *, template: str | None = None) -> str:
        """A new empty database (or a copy of `template`, a database URL); its URL."""
        self._count += 1
        name = f"{self.prefix}_{self._count}"
        sql = f'CREATE DATABASE "{name}"'
        if template is not None:
            sql += f' TEMPLATE "{database_name(template)}"'
        self._admin(sql)
        self.created.append(name)
        return with_database(self.server_url, name)

    def migrated_template(self, workdir: Path | None = None) -> str:
        """The URL of a migrated database to copy (migrated on the first call)."""
        if self._template is None:
            url = self.create()
            Hub(database_url=url, workdir=workdir).migrate()
            self._template = url
        return self._template

    def drop(self, url: str) -> None:
        name = database_name(url)
        # FORCE (PostgreSQL 13+) ends the sessions a killed hub process left behind.
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            self.drop(with_database(self.server_url, name))
        self._template = None

    def block(self, url: str) -> None:
        """Make the database unavailable: no new connections, existing ones ended."""
        name = database_name(url)
        self._admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        with pg_connect(with_database(self.server_url, "postgres"), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )

    def unblock(self, url: str) -> None:
        self._admin(f'ALTER DATABASE "{database_name(url)}" ALLOW_CONNECTIONS true')


class HubProcess:
    """One subprocess of the hub, its output kept in a log file."""

    def __init__(self, *, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self._log = log.open("ab")
        self.popen = subprocess.Popen(
            args,
            cwd=PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: the worker stops claiming and hands back what it holds."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)
        finally:
            self._log.close()

    def kill(self) -> int:
        """SIGKILL: a crash, nothing handed back."""
        if self.alive:
            self.popen.kill()
        code = self.popen.wait(10)
        self._log.close()
        return code

    def _check_alive(self) -> None:
        if not self.alive:
            tail = self.log()[-3000:]
            raise HubError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


class ServerProcess(HubProcess):
    """`uvicorn omnihub.asgi:application --lifespan on` on a free port."""

    def __init__(self, *, port: int, **kwargs: Any) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        super().__init__(**kwargs)
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def wait_ready(self, timeout: float = 45.0) -> None:
        # uvicorn serves only once the lifespan startup (the worker) is done.
        def answers() -> bool:
            self._check_alive()
            try:
                self.http.get("/webhook/evolution", timeout=2.0)
            except httpx.TransportError:
                return False
            return True

        wait_until(answers, timeout=timeout, interval=0.1, what=f"{self.name} to answer")

    def post_webhook(
        self,
        path: str,
        body: Any,
        *,
        token: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        headers = {"X-Webhook-Token": token} if token else {}
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        return self.http.post(
            path,
            content=content,
            params=params,
            headers={"content-type": "application/json", **headers},
        )

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, headers={"x-api-key": API_KEY}, **kwargs)

    def _close(self) -> None:
        self.http.close()

    def stop(self, timeout: float = 20.0) -> int:
        self._close()
        return super().stop(timeout)

    def kill(self) -> int:
        self._close()
        return super().kill()


class WorkerProcess(HubProcess):
    """`manage.py run_worker`."""

    def wait_ready(self, timeout: float = 45.0) -> None:
        def started() -> bool:
            self._check_alive()
            return "worker started" in self.log()

        wait_until(started, timeout=timeout, interval=0.1, what=f"{self.name} to start")


class Hub:
    """Servers and workers sharing one DATABASE_URL and one environment."""

    def __init__(
        self,
        *,
        database_url: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: Path | None = None,
        fast: bool = True,
    ) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="omnihub-e2e-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url or sqlite_url(self.workdir / "hub.sqlite3")
        self.env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        self.env.update(BASE_ENV)
        if fast:
            self.env.update(FAST_ENV)
        self.env.update(env or {})
        self.env["DATABASE_URL"] = self.database_url
        self.servers: list[ServerProcess] = []
        self.workers: list[WorkerProcess] = []
        self._count = 0
        self._pg: psycopg.Connection[Any] | None = None

    # --- database ---------------------------------------------------------
    @property
    def sqlite_path(self) -> Path | None:
        parts = urlsplit(self.database_url)
        return Path(parts.path) if parts.scheme == "sqlite" else None

    def manage(self, *args: str, timeout: float = 120.0) -> str:
        result = subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=PROJECT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise HubError(f"manage.py {args[0]} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def migrate(self, *, template: Path | None = None) -> None:
        """Create the schema; with a migrated SQLite `template`, copy it instead (faster)."""
        target = self.sqlite_path
        if template is not None and target is not None:
            shutil.copyfile(template, target)
            return
        self.manage("migrate", "--noinput", "-v0")

    def shell(self, code: str) -> str:
        return self.manage("shell", "-c", code)

    @property
    def is_postgres(self) -> bool:
        return is_postgres(self.database_url)

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, read straight from the database (write SQL with ? placeholders).

        Both backends give the same Python values for what tests compare: JSON
        columns come back as text on PostgreSQL too (as SQLite stores them).
        """
        path = self.sqlite_path
        if path is not None:
            connection = sqlite3.connect(path, timeout=20)
            try:
                cursor = connection.execute(sql, tuple(params))
                names = [column[0] for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            finally:
                connection.close()
        import psycopg

        try:
            return self._pg_query(sql, params)
        except psycopg.OperationalError:
            # The server ended the session (a test blocked the database): once more.
            self._close_pg()
            return self._pg_query(sql, params)

    def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        """Change rows straight in the database (a test moving a time forward)."""
        path = self.sqlite_path
        if path is not None:
            with contextlib.closing(sqlite3.connect(path, timeout=20)) as connection:
                connection.execute(sql, tuple(params))
                connection.commit()
            return
        self._pg_query(sql, params, fetch=False)

    def db_time(self, value: Any) -> Any:
        """A datetime as this hub's database stores it (SQLite: Django's UTC text)."""
        if self.sqlite_path is not None:
            return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return value

    def _pg_query(
        self, sql: str, params: Iterable[Any], *, fetch: bool = True
    ) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row
        from psycopg.types.string import TextLoader

        if self._pg is None or self._pg.closed:
            # Kept open: tests poll the database every few milliseconds.
            self._pg = pg_connect(self.database_url, autocommit=True, row_factory=dict_row)
            for json_type in ("json", "jsonb"):
                self._pg.adapters.register_loader(json_type, TextLoader)
        cursor = self._pg.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]
        return list(cursor.fetchall()) if fetch else []  # type: ignore[arg-type]

    def _close_pg(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.close()
            self._pg = None

    def messages(self, instance: str) -> list[dict[str, Any]]:
        """The instance's InboundMessage rows, oldest first."""
        return self.query(
            "SELECT m.* FROM webhooks_inboundmessage m "
            "JOIN instances_instanceconfig i ON i.id = m.instance_id "
            "WHERE i.name = ? ORDER BY m.id",
            [instance],
        )

    def message(self, instance: str, message_id: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT m.* FROM webhooks_inboundmessage m "
            "JOIN instances_instanceconfig i ON i.id = m.instance_id "
            "WHERE i.name = ? AND m.message_id = ?",
            [instance, message_id],
        )
        return rows[0] if rows else None

    def wait_for_message(
        self,
        instance: str,
        message_id: str,
        *,
        statuses: Iterable[str] = ("replied", "failed", "ignored"),
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        wanted = set(statuses)
        last: dict[str, Any] = {}

        def finished() -> dict[str, Any] | None:
            row = self.message(instance, message_id)
            last["row"] = row
            return row if row and row["status"] in wanted else None

        try:
            return wait_until(finished, timeout=timeout, what=f"message {message_id} in {wanted}")
        except TimeoutError as exc:
            row = last.get("row") or {}
            state = {k: row.get(k) for k in ("status", "attempts", "last_error")}
            raise TimeoutError(f"{exc}; last seen {state}; logs in {self.workdir}") from exc

    def status_counts(self) -> dict[str, int]:
        rows = self.query(
            "SELECT status, COUNT(*) AS n FROM webhooks_inboundmessage GROUP BY status"
        )
        return {row["status"]: row["n"] for row in rows}

    def wait_until_finished(
        self, count: int, *, timeout: float = 120.0, stall: float = 30.0
    ) -> dict[str, int]:
        """Wait until `count` messages are replied, failed or ignored; their status counts.

        Fails early when none finished for `stall` seconds: a wedged hub shows up
        as that, with the counts and what its logs repeat most, not as a timeout.
        """
        deadline = time.monotonic() + timeout
        progress_at, last = time.monotonic(), -1
        while True:
            counts = self.status_counts()
            finished = sum(counts.get(s, 0) for s in ("replied", "failed", "ignored"))
            if finished >= count:
                return counts
            now = time.monotonic()
            if finished != last:
                progress_at, last = now, finished
            if now - progress_at > stall or now > deadline:
                why = f"no message finished for {stall:g}s" if now <= deadline else "timed out"
                raise TimeoutError(
                    f"{why}: {finished}/{count} finished, statuses {counts}; "
                    f"most repeated log errors: {self.log_errors()}; logs in {self.workdir}"
                )
            time.sleep(0.2)

    def log_errors(self, top: int = 3) -> list[tuple[str, int]]:
        """The most frequent `error=...` / ERROR lines of all processes, without ids."""
        found: Counter[str] = Counter()
        for process in [*self.servers, *self.workers]:
            for line in process.log().splitlines():
                if "error=" in line and "error=False" not in line:
                    found[line.split("error=", 1)[1][:120]] += 1
                elif " ERROR " in line:
                    found[line.split(" ERROR ", 1)[1].split(" id=")[0][:120]] += 1
        return found.most_common(top)

    # --- processes ----------------------------------------------------------
    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{kind}-{self._count}"

    def start_server(
        self,
        *,
        embedded_worker: bool = True,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> ServerProcess:
        """Start a server; with wait=False, call its wait_ready() before using it."""
        port = free_port()
        name = self._name("server")
        server = ServerProcess(
            port=port,
            name=name,
            args=[
                PYTHON, "-m", "uvicorn", "omnihub.asgi:application",
                "--host", "127.0.0.1", "--port", str(port),
                "--lifespan", "on", "--no-access-log",
            ],
            env={
                **self.env,
                "OMNIHUB_EMBEDDED_WORKER": "true" if embedded_worker else "false",
                **(env or {}),
            },
            log=self.workdir / f"{name}.log",
        )
        self.servers.append(server)
        if wait:
            server.wait_ready()
        return server

    def start_worker(
        self,
        *,
        concurrency: int | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        name = self._name("worker")
        args = [PYTHON, "manage.py", "run_worker"]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        worker = WorkerProcess(
            name=name, args=args, env={**self.env, **(env or {})}, log=self.workdir / f"{name}.log"
        )
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def start(
        self,
        *,
        servers: int = 1,
        workers: int = 0,
        embedded_worker: bool | None = None,
        worker_concurrency: int | None = None,
    ) -> "Hub":
        """Start N servers and M standalone workers at once, and wait until all are ready.

        Servers embed a worker unless there are standalone ones.
        """
        embedded = workers == 0 if embedded_worker is None else embedded_worker
        started: list[ServerProcess | WorkerProcess] = [
            self.start_server(embedded_worker=embedded, wait=False) for _ in range(servers)
        ]
        started += [
            self.start_worker(concurrency=worker_concurrency, wait=False) for _ in range(workers)
        ]
        for process in started:
            process.wait_ready()
        return self

    @property
    def server(self) -> ServerProcess:
        """The first server still running."""
        for server in self.servers:
            if server.alive:
                return server
        raise HubError("no hub server is running")

    def stop(self) -> None:
        for process in [*self.servers, *self.workers]:
            if process.alive:
                process.stop()
            else:
                with contextlib.suppress(Exception):
                    process.kill()
        self._close_pg()

    def __enter__(self) -> "Hub":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- tenants ----------------------------------------------------------
    def create_instance(self, **fields: Any) -> dict[str, Any]:
        """Create a tenant through the REST API of a running server; returns the fields sent."""
        response = self.server.api("POST", "/api/v1/instances/", json=fields)
        if response.status_code != 201:
            raise HubError(f"creating {fields.get('name')}: {response.status_code} {response.text}")
        return fields

    def create_instances_offline(self, instances: Iterable[Mapping[str, Any]]) -> None:
        """Create tenants with save_instance() in one `manage.py shell` (no server needed)."""
        payload = json.dumps(list(instances))
        self.shell(
            "import json\n"
            "from instances.models import InstanceConfig\n"
            "from instances.services import save_instance\n"
            f"for fields in json.loads({payload!r}):\n"
            "    save_instance(instance=InstanceConfig(**fields))\n"
        )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- deliveries -------------------------------------------------------------
def text_delivery(
    *,
    message_id: str,
    text: str,
    phone: str = "5511987654321",
    push_name: str = "Maria Souza",
    instance: str = "tenant-wa",
    timestamp: int | None = None,
    server_url: str = "https://evolution.example.com",
    apikey: str | None = None,
    from_me: bool = False,
    group: str | None = None,
    mentions: Sequence[str] = (),
    quoted_id: str | None = None,
) -> dict[str, Any]:
    """A messages.upsert of a plain text, as Evolution 2.3.7 posts it (trimmed).

    `from_me`: written from the business's own phone. `group` (a …@g.us JID):
    sent in that group by `phone`; `mentions` and `quoted_id` fill contextInfo.
    """
    key: dict[str, Any] = {
        "remoteJid": group or f"{phone}@s.whatsapp.net",
        "fromMe": from_me,
        "id": message_id,
        "participant": f"{phone}@s.whatsapp.net" if group else "",
        "addressingMode": "pn",
    }
    message: dict[str, Any] = {"conversation": text}
    data: dict[str, Any] = {
        "key": key,
        "pushName": push_name,
        "status": "DELIVERY_ACK",
        "message": message,
        "messageType": "conversation",
        "messageTimestamp": int(time.time()) if timestamp is None else timestamp,
        "source": "android",
    }
    if mentions or quoted_id:
        context: dict[str, Any] = {"mentionedJid": list(mentions)}
        if quoted_id:
            context.update(stanzaId=quoted_id, quotedMessage={"conversation": "earlier"})
        data["contextInfo"] = context
    return {
        "event": "messages.upsert",
        "instance": instance,
        "data": data,
        "destination": "https://hub.example.com/webhook/evolution",
        "date_time": "2025-12-06T09:26:23.101Z",
        "sender": "5511900000001@s.whatsapp.net",
        "server_url": server_url,
        "apikey": apikey,
    }


# --- many deliveries at once ------------------------------------------------------
@dataclass
class Post:
    """One webhook POST; `answers` gets every status it was answered with (503s included)."""

    url: str
    body: dict[str, Any]
    token: str = ""
    answers: list[str] | None = None

    @property
    def message_id(self) -> str:
        return self.body["data"]["key"]["id"]

    @property
    def final(self) -> str:
        """The last answer: "queued", "duplicate", "ignored" or "HTTP <code>"."""
        return self.answers[-1] if self.answers else ""


# Evolution retries a 5xx; so do these helpers, this many times.
RETRIES_OF_5XX = 20


def deliver(
    chains: Sequence[Sequence[Sequence[Post]]], *, concurrency: int = 32, timeout: float = 60.0
) -> None:
    """Post webhooks as Evolution would, `concurrency` chains at a time.

    A chain (a chat) is a list of steps posted one after the other; the posts
    of a step (copies of one delivery) go out at once. A 5xx answer is retried
    like Evolution does. Every post's answers are kept on it.
    """
    asyncio.run(_deliver(chains, concurrency=concurrency, timeout=timeout))


async def _deliver(
    chains: Sequence[Sequence[Sequence[Post]]], *, concurrency: int, timeout: float
) -> None:
    pending = list(reversed(chains))
    client = KeepAliveClient()

    async def post(item: Post) -> None:
        item.answers = []
        headers = {"content-type": "application/json"}
        if item.token:
            headers["x-webhook-token"] = item.token
        content = json.dumps(item.body).encode()
        for attempt in range(RETRIES_OF_5XX + 1):
            status, data = await asyncio.wait_for(client.post(item.url, content, headers), timeout)
            if status == 200:
                item.answers.append(json.loads(data)["status"])
                return
            item.answers.append(f"HTTP {status}")
            if status < 500 or attempt == RETRIES_OF_5XX:
                return
            await asyncio.sleep(0.05 * (attempt + 1))

    async def run_chains() -> None:
        while pending:
            for step in pending.pop():
                await asyncio.gather(*(post(item) for item in step))

    try:
        await asyncio.gather(*(run_chains() for _ in range(concurrency)))
    finally:
        client.close()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class KeepAliveClient:
    """A minimal HTTP/1.1 client on kept-alive asyncio streams, for load.

    httpx spends ~5 ms of CPU on a request on a 2-core test machine: sending
    thousands of webhooks with it made the test process, not the hub, the
    bottleneck. This one spends a small fraction of that.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[Stream]] = {}

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        parts = urlsplit(url)
        address = (parts.hostname or "127.0.0.1", parts.port or 80)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {path} HTTP/1.1", f"host: {parts.netloc}", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        idle = self._idle.setdefault(address, [])
        while True:
            reused = bool(idle)
            reader, writer = idle.pop() if reused else await asyncio.open_connection(*address)
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if reused:
                    continue  # the server closed a connection that sat idle: nothing was sent
                raise
            status, keep_alive, data = await _read_response(reader, head)
            if keep_alive:
                idle.append((reader, writer))
            else:
                writer.close()
            return status, data

    def close(self) -> None:
        for streams in self._idle.values():
            for _, writer in streams:
                writer.close()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader, head: bytes) -> tuple[int, bool, bytes]:
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    if fields.get("transfer-encoding") == "chunked":
        data = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            data += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        data = await reader.readexactly(int(fields.get("content-length", 0)))
    return status, fields.get("connection") != "close", data


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]
