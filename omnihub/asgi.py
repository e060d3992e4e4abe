"""ASGI entry point: Django, plus the embedded worker started with the lifespan.

Django's ASGI handler refuses the lifespan protocol, so lifespan messages are
answered here and everything else goes to Django.
"""

import asyncio
import logging
import os
from typing import Any

from django.core.asgi import get_asgi_application
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import set_script_prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omnihub.settings")
django_application = get_asgi_application()

from asgiref.sync import sync_to_async  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import close_old_connections  # noqa: E402

from instances.checks import secrets_problem  # noqa: E402
from omnihub.startup import freeze_startup_objects  # noqa: E402
from webhooks.worker import Worker  # noqa: E402


class LeanASGIHandler(ASGIHandler):
    """Django for /webhook/ and /health: no middleware, no per-request signals.

    These views need no session, auth, CSRF or messages middleware, and they do
    their database work on webhooks.db's own thread, so the request_started /
    request_finished connection handling (a thread hop each way per request)
    has nothing to do. On this path that machinery costs more than the view.
    """

    def load_middleware(self, is_async: bool = False) -> None:
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.LEAN_MIDDLEWARE
        try:
            super().load_middleware(is_async=is_async)
        finally:
            settings.MIDDLEWARE = full

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            response = error_response
        else:
            response = await self.run_get_response(request)
        try:
            await self.send_response(response, send)
        finally:
            body_file.close()


lean_application = LeanASGIHandler()

logger = logging.getLogger("omnihub.asgi")
LEAN_PREFIXES = ("/webhook/", "/health")


def _startup_problem() -> str | None:
    try:
        return secrets_problem()
    finally:
        close_old_connections()


async def lifespan(receive: Any, send: Any) -> None:
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            problem = await sync_to_async(_startup_problem)()
            if problem is not None:
                # Refuse to start rather than fail every delivery on its tenant's secrets.
                logger.error("cannot start: %s", problem)
                await send({"type": "lifespan.startup.failed", "message": problem})
                return
            freeze_startup_objects()
            if settings.OMNIHUB_EMBEDDED_WORKER:
                task = asyncio.create_task(Worker().run(stop=stop))
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            stop.set()
            if task is not None:
                await task
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http" and scope["path"].startswith(LEAN_PREFIXES):
        await lean_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)
