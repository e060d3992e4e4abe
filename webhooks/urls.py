from django.urls import re_path

from webhooks import views

# /webhook/evolution[/<segment>[/<event>]] with or without a trailing slash.
urlpatterns = [
    re_path(
        r"^webhook/evolution(?:/(?P<segment>[^/]+))?(?:/(?P<event>[^/]+))?/?$",
        views.evolution_webhook,
        name="evolution-webhook",
    ),
]
