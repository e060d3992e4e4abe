"""Running ORM code from async code on a small pool of long-lived threads.

Django's ASGI handler runs each request's sync code in a thread of its own
and closes the database connection when the request ends: on the webhook
path that is a new SQLite connection (or pool checkout), its PRAGMAs and a
close for every delivery, several times the cost of the INSERT itself. Here
a fixed number of threads keep one connection each for the life of the
process, so the number of connections stays bounded (DB_THREADS per process);
a connection that raised a database error is closed and opened anew.
"""

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=settings.DB_THREADS, thread_name_prefix="omnihub-db"
            )
        return _executor


def _call(fn: Callable[..., T], kwargs: dict[str, Any]) -> T:
    try:
        return fn(**kwargs)
    except DatabaseError:
        # The connection may be broken (database restarted): start afresh next time.
        connection.close()
        raise


async def run_db(fn: Callable[..., T], /, **kwargs: Any) -> T:
    if settings.DB_THREADS <= 0:
        # Tests: run where the test's own connection and transaction live.
        return await sync_to_async(fn)(**kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_get_executor(), functools.partial(_call, fn, kwargs))
