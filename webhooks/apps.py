from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webhooks"
    verbose_name = "Messages"

    def ready(self) -> None:
        # The conversations' admin lives beside the message log's (webhooks/admin.py).
        from webhooks import admin_conversations  # noqa: F401
