"""Fake agent and fake Evolution API as one small ASGI app, for the benchmark.

Run: uvicorn bench.fake_servers:app --port N (env FAKE_AGENT_DELAY=seconds).
  POST /api/v1/agent/<name>/run    waits FAKE_AGENT_DELAY, answers {"message": ...}
  POST /fast/api/v1/agent/<name>/run  the same at once
  POST /message/sendText/<inst>    answers 201
  POST /chat/sendPresence/<inst>   answers 201
  GET  /_records                   every request seen: [kind, message id, t_in, t_out]
  GET  /_records?sent=<id>         the sendText of that message id, if seen
Times are time.time() on this machine, comparable with the load generator's.
"""

import asyncio
import json
import os
import time
import uuid
from typing import Any

DELAY = float(os.environ.get("FAKE_AGENT_DELAY", "0"))
records: list[tuple[str, str, float, float]] = []


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send: Any, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    t_in = time.time()
    path = scope["path"]
    raw = await _read_body(receive)
    if path == "/_records":
        query = scope["query_string"].decode()
        if query.startswith("sent="):
            wanted = query[5:]
            await _answer(send, 200, [r for r in records if r[0] == "send" and r[1] == wanted])
        else:
            await _answer(send, 200, records)
        return
    body = json.loads(raw) if raw else {}
    if path.startswith(("/api/v1/agent/", "/fast/api/v1/agent/")):
        message_id = body["channel_payload"]["data"]["key"]["id"]
        if DELAY and not path.startswith("/fast/"):
            await asyncio.sleep(DELAY)
        t_out = time.time()
        records.append(("agent", message_id, t_in, t_out))
        # The reply carries the id, so the sendText can be matched to it.
        await _answer(send, 200, {"message": f"ok {message_id}"})
    elif path.startswith("/message/sendText/"):
        records.append(("send", body["text"].split()[-1], t_in, time.time()))
        # Each message its own id, as WhatsApp gives it (the hub stores it).
        await _answer(send, 201, {"key": {"id": f"3EB0{uuid.uuid4().hex[:18].upper()}"}})
    elif path.startswith("/chat/sendPresence/"):
        await _answer(send, 201, {})
    else:
        await _answer(send, 404, {"status": 404})
