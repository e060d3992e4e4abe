"""Fake Evolution API and fake agent servers on 127.0.0.1, for end-to-end tests and bench.

Each runs a real HTTP server in a background thread, records every request it
gets, and answers from a small, changeable script.
"""

import base64
import contextlib
import json
import math
import re
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (a killed hub, a timed-out call) is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)
    # When the answer was written back (time.time()); None until then.
    answered_at: float | None = None
    status: int | None = None
    # The body answered (sendText's key.id is how a test sends the hub's echo back).
    answer: Any = None
    # The body as it came, byte for byte (what a signature is computed over).
    raw: bytes = b""


# An answer is (status, body); a bytes body is sent as is, anything else as JSON.
Answer = tuple[int, Any]
# As a body: the server acts on the request (the status is recorded) but hangs
# up before answering, as when a connection drops after the request was written.
DROP = object()
Responder = Callable[[Recorded], Answer]


class FakeServer:
    """A threaded HTTP server; `respond` decides each answer (status, JSON body).

    Before `respond`, answers queued with `answer_next` are used once each, then
    responders set with `on` (the first whose path part matches).
    """

    def __init__(self, respond: Responder, *, port: int = 0) -> None:
        self.respond = respond
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self._arrived = threading.Condition(self.lock)
        self._queued: deque[tuple[str, Answer]] = deque()
        self._routes: list[tuple[str, Responder]] = []
        self._connections: set[socket.socket] = set()
        self._handler = self._make_handler()
        self.server = self._listen(port)
        self.port: int = self.server.server_address[1]
        self.thread = self._serve_thread()

    def _make_handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in one segment: written apart, Nagle and the
            # client's delayed ACK would add ~40 ms to answers (and to latency numbers).
            wbufsize = -1
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                with outer.lock:
                    outer._connections.add(self.connection)

            def finish(self) -> None:
                with outer.lock:
                    outer._connections.discard(self.connection)
                super().finish()

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                if len(raw) < length:
                    # The client hung up half-way (a killed hub process): a real
                    # server never acts on a truncated request, so it is not one.
                    self.close_connection = True
                    return
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                record = Recorded(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    raw=raw,
                )
                with outer.lock:
                    outer.requests.append(record)
                    outer._arrived.notify_all()
                status, answer = outer._answer_for(record)
                if answer is DROP:
                    record.status = status
                    self.close_connection = True
                    return
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                record.status, record.answer = status, answer
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                finally:
                    record.answered_at = time.time()

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def _listen(self, port: int) -> ThreadingHTTPServer:
        server = _QuietServer(("127.0.0.1", port), self._handler)
        server.daemon_threads = True
        return server

    def _answer_for(self, record: Recorded) -> Answer:
        with self.lock:
            for queued in self._queued:
                if queued[0] in record.path:
                    self._queued.remove(queued)
                    return queued[1]
            routes = list(self._routes)
        for path_part, responder in routes:
            if path_part in record.path:
                return responder(record)
        return self.respond(record)

    def _serve_thread(self) -> threading.Thread:
        # A short poll interval makes stop() quick: tests stop two fakes each.
        return threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._drop_connections()

    def pause(self) -> None:
        """Refuse connections (and cut open ones) until `resume`: a server that went down."""
        self.stop()

    def resume(self) -> None:
        """Listen again on the same port."""
        self.server = self._listen(self.port)
        self.thread = self._serve_thread()
        self.thread.start()

    def _drop_connections(self) -> None:
        # Keep-alive connections outlive the listening socket; a server that
        # went down would not answer on them either.
        with self.lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def answer_next(self, path_part: str, *answers: Answer) -> None:
        """Answer the next requests whose path holds `path_part` with these, once each."""
        with self.lock:
            self._queued.extend((path_part, answer) for answer in answers)

    def on(self, path_part: str, responder: Responder | None) -> None:
        """Answer every request whose path holds `path_part` with `responder` (None: stop)."""
        with self.lock:
            self._routes = [route for route in self._routes if route[0] != path_part]
            if responder is not None:
                self._routes.append((path_part, responder))

    def received(self, path_part: str = "") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if path_part in r.path]

    def wait_for(self, path_part: str, count: int, timeout: float = 15.0) -> list[Recorded]:
        """The requests whose path holds `path_part`, once `count` arrived or at the timeout."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                found = [r for r in self.requests if path_part in r.path]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    return found
                self._arrived.wait(remaining)


# A 1x1 PNG: what the QR code image of the fake looks like.
QR_DATA_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
PAIRING_CODE = "WZYEH1YY"
_EVOLUTION_API = Path(__file__).parent / "fixtures" / "evolution" / "api"


def _evolution_error(status: int, error: str, message: Any) -> Answer:
    return status, {"status": status, "error": error, "response": {"message": message}}


class FakeEvolution(FakeServer):
    """Answers like Evolution 2.3.7: sendText, sendMedia and sendPresence (201 + message key),
    findMessages (from what it sent and was given with `receive`), and the
    provisioning routes (instance create/connect/connectionState, webhook set/find).

    `api_key`, when set, is the only key accepted (others: 401); `license_required`
    makes the provisioning routes answer Evolution 2.4's 503 license body.
    `keeps_messages = False` is an Evolution run with DATABASE_SAVE_DATA_NEW_MESSAGE=false:
    findMessages answers an empty page. `drop_sends = n`: the next n texts are sent, but
    the connection drops before sendText answers.
    """

    def __init__(self, *, port: int = 0, api_key: str | None = None) -> None:
        self.failure: Answer | None = None
        self.api_key = api_key
        self.license_required = False
        self.keeps_messages = True
        self.drop_sends = 0
        # getBase64FromMediaMessage: message id -> (bytes, mimetype, fileName);
        # `media_failures = n`: the next n answer Evolution's intermittent 400.
        self.media: dict[str, tuple[bytes, str, str]] = {}
        self.media_failures = 0
        # Evolution's Message table: what it sent and received, as findMessages reads it.
        self.stored: list[dict[str, Any]] = []
        # Seconds a create with qrcode: true waits before answering (the real
        # server waits 5 s for the first QR code), after the instance exists.
        self.create_delay = 0.0
        # Instance name -> {"state", "webhook", "connects"}.
        self.instances: dict[str, dict[str, Any]] = {}
        super().__init__(self._answer, port=port)

    def open_session(self, name: str) -> None:
        """The phone scanned the QR code: the instance's state becomes "open"."""
        with self.lock:
            self.instances[name]["state"] = "open"

    def _key_refused(self, record: Recorded) -> bool:
        return self.api_key is not None and record.headers.get("apikey") != self.api_key

    def _answer(self, record: Recorded) -> Answer:
        if record.path.startswith(("/instance/", "/webhook/")):
            # Evolution's guards run in this order: the instance exists (404;
            # create: 403 "already in use"), then the key (401).
            return self._provisioning(record)
        if self._key_refused(record):
            return _evolution_error(401, "Unauthorized", "Unauthorized")
        if self.failure is not None and "/message/sendText/" in record.path:
            return self.failure
        if "/message/sendText/" in record.path or "/message/sendMedia/" in record.path:
            return self._send_text(record)
        if "/chat/findMessages/" in record.path and record.method == "POST":
            return self._find_messages(record)
        if "/chat/sendPresence/" in record.path:
            return 201, {}
        if "/chat/getBase64FromMediaMessage/" in record.path:
            return self._media_of(record)
        if "/chat/markMessageAsRead/" in record.path:
            return 201, {"message": "Read messages", "read": "success"}
        return 404, {"status": 404, "error": "Not Found", "response": {"message": ["nope"]}}

    def sent(self) -> list[Recorded]:
        """sendText requests whose text went out (answered with success, or dropped after)."""
        return [r for r in self.received("/message/sendText/") if r.status and r.status < 300]

    def sent_messages(self) -> list[Recorded]:
        """sendText and sendMedia requests that went out, in the order they came."""
        return [r for r in self.received("/message/send") if r.status and r.status < 300]

    def receive(self, data: dict[str, Any]) -> None:
        """A message came in from WhatsApp (a messages.upsert's data): kept as Evolution does."""
        self._keep(
            key=data["key"],
            message=data.get("message") or {},
            timestamp=int(data.get("messageTimestamp") or time.time()),
            push_name=data.get("pushName", ""),
        )

    def _keep(
        self, *, key: dict[str, Any], message: dict[str, Any], timestamp: int, push_name: str
    ) -> None:
        with self.lock:
            if not self.keeps_messages:
                return
            # The columns findMessages selects (channel.service.ts, fetchMessages).
            self.stored.append(
                {
                    "id": uuid.uuid4().hex[:25],
                    "key": key,
                    "pushName": push_name,
                    "messageType": "conversation",
                    "message": message,
                    "messageTimestamp": timestamp,
                    "instanceId": "6f1c2b7e-9a4d-4c51-8e2f-3b0d5a7c9e11",
                    "source": "unknown",
                    "contextInfo": None,
                    "MessageUpdate": [],
                }
            )

    def _send_text(self, record: Recorded) -> Answer:
        body = record.body if isinstance(record.body, dict) else {}
        number = str(body.get("number", ""))
        key = {
            "remoteJid": number if "@" in number else f"{number}@s.whatsapp.net",
            "fromMe": True,
            # Each message its own id, as WhatsApp gives it.
            "id": f"3EB0{uuid.uuid4().hex[:18].upper()}",
        }
        if "/message/sendMedia/" in record.path:
            kind = str(body.get("mediatype", "document"))
            message: dict[str, Any] = {
                f"{kind}Message": {"caption": body.get("caption", ""), "url": body.get("media")}
            }
        else:
            message = {"conversation": body.get("text", "")}
        # Sent, then saved (when kept), then answered: as sendMessageWithTyping does.
        self._keep(
            key=key,
            message=message,
            timestamp=int(time.time()),
            push_name="Você",
        )
        with self.lock:
            dropped = self.drop_sends > 0
            self.drop_sends -= int(dropped)
        if dropped:
            return 201, DROP
        return 201, {"key": key, "status": "PENDING"}

    def _media_of(self, record: Recorded) -> Answer:
        """getBase64FromMediaMessage as Evolution 2.3.7 answers it (201), or its 400s."""
        body = record.body if isinstance(record.body, dict) else {}
        message_id = str(((body.get("message") or {}).get("key") or {}).get("id", ""))
        with self.lock:
            failing = self.media_failures > 0
            self.media_failures -= int(failing)
            found = self.media.get(message_id)
        if failing:
            return _evolution_error(400, "Bad Request", "AggregateError")
        if found is None:
            return _evolution_error(400, "Bad Request", "Message not found")
        data, mimetype, file_name = found
        return 201, {
            "mediaType": f"{mimetype.split('/')[0]}Message",
            "fileName": file_name,
            "size": {"fileLength": {"low": len(data), "high": 0, "unsigned": True}},
            "mimetype": mimetype,
            "base64": base64.b64encode(data).decode(),
            "buffer": None,
        }

    def _find_messages(self, record: Recorded) -> Answer:
        """Evolution 2.x's fetchMessages: key.id/fromMe/remoteJid equal (fromMe only when
        true), messageTimestamp only with both gte and lte, newest first, paginated."""
        query = record.body if isinstance(record.body, dict) else {}
        where = query.get("where") or {}
        key = where.get("key") or {}
        stamps = where.get("messageTimestamp") or {}
        span = None
        if stamps.get("gte") and stamps.get("lte"):
            span = [int(datetime.fromisoformat(stamps[end]).timestamp()) for end in ("gte", "lte")]
        with self.lock:
            found = [
                row
                for row in self.stored
                if all(
                    row["key"].get(name) == key[name]
                    for name in ("id", "remoteJid")
                    if key.get(name)
                )
                and (not key.get("fromMe") or row["key"].get("fromMe") is True)
                and (span is None or span[0] <= row["messageTimestamp"] <= span[1])
            ]
        found.sort(key=lambda row: row["messageTimestamp"], reverse=True)
        size = query.get("offset") or 50
        page = query.get("page") or 1
        return 200, {
            "messages": {
                "total": len(found),
                "pages": math.ceil(len(found) / size),
                "currentPage": page,
                "records": found[size * (page - 1) : size * page],
            }
        }

    def _provisioning(self, record: Recorded) -> Answer:
        if self.license_required:
            body = json.loads((_EVOLUTION_API / "error-503-license-required-v2.4.json").read_text())
            return 503, body
        split = urlsplit(record.path)
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        unauthorized = _evolution_error(401, "Unauthorized", "Unauthorized")
        if parts == ["instance", "create"] and record.method == "POST":
            body = record.body if isinstance(record.body, dict) else {}
            with self.lock:
                taken = body.get("instanceName") in self.instances
            if taken:
                message = f'This name "{body.get("instanceName")}" is already in use.'
                return _evolution_error(403, "Forbidden", [message])
            return unauthorized if self._key_refused(record) else self._create(body)
        if parts == ["instance", "fetchInstances"] and record.method == "GET":
            return unauthorized if self._key_refused(record) else self._fetch(split.query)
        if len(parts) != 3:
            return _evolution_error(404, "Not Found", [f"Cannot {record.method} {record.path}"])
        group, route, name = parts
        with self.lock:
            instance = self.instances.get(name)
            if instance is None:
                return _evolution_error(404, "Not Found", [f'The "{name}" instance does not exist'])
            if self._key_refused(record):
                return unauthorized
            return self._instance_route(record, f"{group}/{route}", name, instance)

    def _fetch(self, query: str) -> Answer:
        wanted = parse_qs(query).get("instanceName", [None])[0]
        with self.lock:
            if wanted is not None and wanted not in self.instances:
                return _evolution_error(404, "Not Found", [f'Instance "{wanted}" not found'])
            names = [wanted] if wanted is not None else list(self.instances)
            return 200, [
                {"id": f"id-{n}", "name": n, "connectionStatus": self.instances[n]["state"]}
                for n in names
            ]

    def _create(self, body: dict[str, Any]) -> Answer:
        name = body.get("instanceName")
        if not isinstance(name, str) or not name:
            return _evolution_error(
                400, "Bad Request", ['instance requires property "instanceName"']
            )
        given = body.get("webhook")
        with self.lock:
            self.instances[name] = {"state": "close", "webhook": None, "connects": 0}
            if isinstance(given, dict) and given.get("url"):
                # As 2.3.7 does with a webhook in the create request.
                self.instances[name]["webhook"] = {
                    "id": f"webhook-{name}",
                    "url": given["url"],
                    "headers": given.get("headers") or {},
                    "enabled": True,
                    "events": list(given.get("events") or []),
                    "webhookByEvents": bool(given.get("byEvents")),
                    "webhookBase64": bool(given.get("base64")),
                    "instanceId": f"id-{name}",
                }
        if body.get("qrcode") and self.create_delay:
            time.sleep(self.create_delay)
        return 201, {
            "instance": {
                "instanceName": name,
                "instanceId": f"id-{name}",
                "integration": body.get("integration", "WHATSAPP-BAILEYS"),
                "status": "close",
            },
            "hash": f"HASH-{name}",
            "webhook": {},
            "qrcode": {"count": 0},
        }

    def _instance_route(
        self, record: Recorded, route: str, name: str, instance: dict[str, Any]
    ) -> Answer:
        if route == "instance/connectionState" and record.method == "GET":
            return 200, {"instance": {"instanceName": name, "state": instance["state"]}}
        if route == "instance/connect" and record.method == "GET":
            if instance["state"] == "open":
                return 200, {"instance": {"instanceName": name, "state": "open"}}
            instance["state"] = "connecting"
            instance["connects"] += 1
            if instance["connects"] == 1:
                # The session is still starting: Evolution has no QR code to show yet.
                return 200, {"count": 0}
            return 200, {
                "pairingCode": PAIRING_CODE,
                "code": "2@fake-qr-code",
                "base64": QR_DATA_URL,
                "count": 1,
            }
        if route == "webhook/set" and record.method == "POST":
            webhook = (record.body or {}).get("webhook") if isinstance(record.body, dict) else None
            if not isinstance(webhook, dict) or not webhook.get("url"):
                return _evolution_error(400, "Bad Request", ['instance requires property "url"'])
            instance["webhook"] = {
                "id": f"webhook-{name}",
                "url": webhook["url"],
                "headers": webhook.get("headers") or {},
                "enabled": bool(webhook.get("enabled")),
                "events": list(webhook.get("events") or []),
                "webhookByEvents": bool(webhook.get("byEvents")),
                "webhookBase64": bool(webhook.get("base64")),
                "instanceId": f"id-{name}",
            }
            return 201, instance["webhook"]
        if route == "webhook/find" and record.method == "GET":
            return 200, instance["webhook"]
        return _evolution_error(404, "Not Found", [f"Cannot {record.method} {record.path}"])


class FakeAgent(FakeServer):
    """Answers /api/v1/agent/<name>/run with a reply naming the agent and the text."""

    def __init__(self, *, delay: float = 0.0, prefix: str = "reply", port: int = 0) -> None:
        self.delay = delay
        self.prefix = prefix
        self.failure: Answer | None = None
        super().__init__(self._answer, port=port)

    def _answer(self, record: Recorded) -> Answer:
        if self.delay:
            time.sleep(self.delay)
        if self.failure is not None:
            return self.failure
        content = (record.body or {}).get("message_content", "")
        return 200, {"message": f"{self.prefix}: {content}", "success": True}


class FakeOpenAI(FakeServer):
    """An OpenAI-compatible server: POST /v1/chat/completions answers
    "<prefix> <n>: <last user message>"; `completions` are the `messages` it got.
    GET /v1/models lists `models` as OpenAI does ({"object": "list", "data": [...]});
    with `api_key` set, both refuse another Bearer key with OpenAI's 401."""

    def __init__(
        self,
        *,
        prefix: str = "llm",
        models: tuple[str, ...] = ("gpt-4o-mini",),
        api_key: str | None = None,
        port: int = 0,
    ) -> None:
        self.prefix = prefix
        self.models = list(models)
        # /audio/transcriptions: the next `stt_failures` answer 503 (-1: all of them).
        self.stt_failures = 0
        self.api_key = api_key
        super().__init__(self._answer, port=port)

    def _answer(self, record: Recorded) -> Answer:
        if self.api_key is not None and record.headers.get("authorization") != (
            f"Bearer {self.api_key}"
        ):
            message = "Incorrect API key provided. You can find your API key at platform."
            return 401, {"error": {"message": message, "type": "invalid_request_error"}}
        if record.method == "GET" and record.path.endswith("/models"):
            return 200, {
                "object": "list",
                "data": [
                    {"id": model, "object": "model", "created": 1715367049, "owned_by": "system"}
                    for model in self.models
                ],
            }
        if record.path.endswith("/audio/transcriptions"):
            return self._transcription(record)
        if not record.path.endswith("/chat/completions"):
            return 404, {"error": {"message": f"no route {record.path}"}}
        messages = (record.body or {}).get("messages") or [{"content": ""}]
        count = len(self.received("/chat/completions"))
        content = f"{self.prefix} {count}: {messages[-1]['content']}"
        return 200, {
            "id": f"chatcmpl-{count}",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }

    def _transcription(self, record: Recorded) -> Answer:
        """A whisper server: the transcript is the uploaded file's text after "speech:"
        (tests upload b"speech: <what was said>")."""
        with self.lock:
            failing = self.stt_failures != 0
            if self.stt_failures > 0:
                self.stt_failures -= 1
        if failing:
            return 503, {"error": {"message": "The server is overloaded", "type": "server_error"}}
        form = record.body if isinstance(record.body, str) else ""
        model = re.search(r'name="model"\r\n\r\n([^\r]*)', form)
        if model is None or 'name="file"' not in form:
            return 400, {"error": {"message": "file and model are required"}}
        said = re.search(r"speech: ([^\r]*)", form)
        return 200, {"text": said.group(1) if said else ""}

    @property
    def transcriptions(self) -> list[Recorded]:
        return self.received("/audio/transcriptions")

    @property
    def completions(self) -> list[list[dict[str, str]]]:
        return [r.body["messages"] for r in self.received("/chat/completions")]


class FakeWebhookAgent(FakeServer):
    """A workflow behind a webhook (n8n's "Respond to Webhook"): answers
    {"output": "got: <text>"}, or `answer` when set."""

    def __init__(self, *, port: int = 0) -> None:
        self.answer: Answer | None = None
        super().__init__(self._answer, port=port)

    def _answer(self, record: Recorded) -> Answer:
        if self.answer is not None:
            return self.answer
        return 200, {"output": f"got: {(record.body or {}).get('text', '')}"}
