"""What a process does once everything is loaded (omnihub/startup.py)."""

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from omnihub.asgi import application
from omnihub.startup import freeze_startup_objects


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class Node:
    def __init__(self) -> None:
        self.me = self


def test_the_startup_objects_are_frozen_and_later_garbage_is_still_collected(unfrozen) -> None:
    freeze_startup_objects()

    # Django's apps, models and URLconf: far more than a handful of objects.
    assert gc.get_freeze_count() > 10_000
    cycle = Node()
    gone = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert gone() is None


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_hub_freezes_its_startup_objects_before_it_serves(unfrozen, settings) -> None:
    settings.OMNIHUB_EMBEDDED_WORKER = False
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []
    frozen_when_started: list[int] = []

    async def receive() -> dict[str, str]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            frozen_when_started.append(gc.get_freeze_count())

    await application({"type": "lifespan"}, receive, send)

    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert frozen_when_started[0] > 10_000
