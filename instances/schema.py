"""The OpenAPI schema's generator (REST_FRAMEWORK's DEFAULT_SCHEMA_CLASS).

Not in instances/permissions.py: drf-spectacular imports DRF's views, which
import the default permission class, so that module must not import it.
"""

from typing import Any

from drf_spectacular.openapi import AutoSchema

from instances.permissions import missing_permission_message, required_permissions


class HubAutoSchema(AutoSchema):
    """drf-spectacular's schema, with each operation's 403 and the permissions it needs."""

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        responses = operation.get("responses", {})
        unauthorized = responses.get("401")
        if unauthorized is not None and "403" not in responses:
            perms = required_permissions(view=self.view)
            responses["403"] = {
                **unauthorized,
                "description": f"A staff user without the permission. "
                f"{missing_permission_message(perms)}",
            }
        return operation
