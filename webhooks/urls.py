from django.urls import path, re_path

from webhooks import health, metrics, views

urlpatterns = [
    # /webhook/evolution[/<segment>[/<event>]] with or without a trailing slash.
    re_path(
        r"^webhook/evolution(?:/(?P<segment>[^/]+))?(?:/(?P<event>[^/]+))?/?$",
        views.evolution_webhook,
        name="evolution-webhook",
    ),
    path("health", health.health, name="health"),
    path("health/ready", health.ready, name="health-ready"),
    path("metrics", metrics.metrics_view, name="metrics"),
]
