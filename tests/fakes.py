"""Fake Evolution API and fake agent servers on 127.0.0.1, for end-to-end tests and bench.

Each runs a real HTTP server in a background thread, records every request it
gets, and answers from a small, changeable script.
"""

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)


Responder = Callable[[Recorded], tuple[int, Any]]


class FakeServer:
    """A threaded HTTP server; `respond` decides each answer (status, JSON body)."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                record = Recorded(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with outer.lock:
                    outer.requests.append(record)
                status, answer = outer.respond(record)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self, path_part: str = "") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if path_part in r.path]

    def wait_for(self, path_part: str, count: int, timeout: float = 15.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.received(path_part)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        return self.received(path_part)


class FakeEvolution(FakeServer):
    """Answers sendText and sendPresence like Evolution 2.3.7 (201 + message key)."""

    def __init__(self) -> None:
        self.failure: tuple[int, Any] | None = None
        super().__init__(self._answer)

    def _answer(self, record: Recorded) -> tuple[int, Any]:
        if self.failure is not None and "/message/sendText/" in record.path:
            return self.failure
        if "/message/sendText/" in record.path:
            number = (record.body or {}).get("number", "")
            return 201, {
                "key": {"remoteJid": f"{number}@s.whatsapp.net", "fromMe": True, "id": "3EB0"},
                "status": "PENDING",
            }
        if "/chat/sendPresence/" in record.path:
            return 201, {}
        return 404, {"status": 404, "error": "Not Found", "response": {"message": ["nope"]}}


class FakeAgent(FakeServer):
    """Answers /api/v1/agent/<name>/run with a reply naming the agent and the text."""

    def __init__(self, *, delay: float = 0.0, prefix: str = "reply") -> None:
        self.delay = delay
        self.prefix = prefix
        self.failure: tuple[int, Any] | None = None
        super().__init__(self._answer)

    def _answer(self, record: Recorded) -> tuple[int, Any]:
        if self.delay:
            time.sleep(self.delay)
        if self.failure is not None:
            return self.failure
        content = (record.body or {}).get("message_content", "")
        return 200, {"message": f"{self.prefix}: {content}", "success": True}
