"""What a process does once everything is loaded, before it serves or works."""

import gc

from django.urls import get_resolver


def freeze_startup_objects() -> None:
    """Keep the objects made at startup out of every later garbage collection.

    Django's apps, models, admin, DRF, the schema generator and the URLconf are
    a few hundred thousand objects that live as long as the process, and each
    collection of the oldest generation traversed them all again: frozen, the
    hub with its worker off stores 15 % more webhooks a second (bench/run.py,
    four runs each). gc.freeze() keeps them tracked but never scanned; what is
    made afterwards is collected as before.
    """
    # The views' modules too, now rather than on the first request.
    get_resolver().url_patterns  # noqa: B018
    gc.collect()
    gc.freeze()
