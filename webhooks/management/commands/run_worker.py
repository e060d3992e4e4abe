"""Run the message worker on its own, for scale-out across processes and machines."""

import asyncio
import signal
from typing import Annotated

import typer
from django.conf import settings
from django_typer.management import TyperCommand

from omnihub.startup import freeze_startup_objects
from webhooks.worker import Worker


class Command(TyperCommand):
    help = "Process queued WhatsApp messages until SIGTERM or SIGINT."

    def handle(
        self,
        concurrency: Annotated[
            int, typer.Option(min=1, max=1000, help="Messages processed at once.")
        ] = settings.WORKER_CONCURRENCY,
        poll_interval: Annotated[
            float, typer.Option(min=0.05, help="Seconds between looks at the queue.")
        ] = settings.WORKER_POLL_INTERVAL,
    ) -> None:
        asyncio.run(self._run(concurrency=concurrency, poll_interval=poll_interval))

    async def _run(self, *, concurrency: int, poll_interval: float) -> None:
        freeze_startup_objects()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Stop claiming, let in-flight messages finish, give back the rest.
            loop.add_signal_handler(sig, stop.set)
        await Worker(concurrency=concurrency, poll_interval=poll_interval).run(stop=stop)
