"""Waking this process's workers: a message stored here starts at once, not at the next poll."""

import asyncio

# The wake-up events of the workers running in this process, with their loops.
# They hold no tenant data.
wake_events: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()


def wake_up() -> None:
    for loop, event in list(wake_events):
        if not loop.is_closed():
            loop.call_soon_threadsafe(event.set)
