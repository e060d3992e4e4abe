"""Cross-process wake-up on PostgreSQL: LISTEN/NOTIFY on one channel.

A delivery stored by any server wakes every standalone worker at once,
instead of at its next poll. On SQLite (one machine) the in-process wake-up
and the poll are enough, and these do nothing.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg
from django.db import connection

logger = logging.getLogger(__name__)

CHANNEL = "omnihub_inbox"


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def notify_new_message() -> None:
    """Inside the storing transaction: PostgreSQL delivers it at commit."""
    if is_postgres():
        with connection.cursor() as cursor:
            cursor.execute(f"NOTIFY {CHANNEL}")


def _conninfo() -> str:
    params = connection.settings_dict
    return psycopg.conninfo.make_conninfo(
        dbname=params["NAME"],
        user=params.get("USER") or None,
        password=params.get("PASSWORD") or None,
        host=params.get("HOST") or None,
        port=str(params["PORT"]) if params.get("PORT") else None,
    )


async def listen(*, on_notify: Callable[[], None], stop: asyncio.Event) -> None:
    """Call on_notify for every NOTIFY until stop is set; reconnect on errors."""
    if not is_postgres():
        return
    conninfo = _conninfo()
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                async for _ in conn.notifies():
                    on_notify()
                    if stop.is_set():
                        return
        except (psycopg.Error, OSError) as exc:
            logger.warning("LISTEN %s failed (%s); polling meanwhile", CHANNEL, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=5.0)
