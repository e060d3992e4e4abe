from typing import Any

from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from instances.permissions import MissingPermission


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, but every failed authentication or permission check is a 401,
    except a staff user's missing model permission (403: they are an API user); a
    body of an unsupported media type is a 400.

    A logged-in user who is not staff is, for this API, not an API user at all.
    """
    if isinstance(exc, exceptions.PermissionDenied) and not isinstance(exc, MissingPermission):
        exc = exceptions.NotAuthenticated(exc.detail)
    if isinstance(exc, exceptions.UnsupportedMediaType):
        # A body without a usable content type is an unreadable body: the 400 every
        # operation documents ('detail'), not a 415 that none does.
        exc = exceptions.ParseError(exc.detail)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, exceptions.ValidationError):
        response.data = flat_errors(response.data)
    if response is not None and isinstance(exc, exceptions.NotAuthenticated):
        response.status_code = 401
        response["WWW-Authenticate"] = "x-api-key"
    return response


def flat_errors(data: Any, prefix: str = "") -> Any:
    """A nested serializer's errors under dotted names ({"media.base64": [...]}), so
    that every 400 has the documented shape: a name, then a message or a list of them."""
    if not isinstance(data, dict):
        return data if not prefix else {prefix: data}
    flat: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, dict):
            flat.update(flat_errors(value, key))
        elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
            # A list of objects: each one's errors under its index.
            for index, item in enumerate(value):
                if item:
                    flat.update(flat_errors(item, f"{key}.{index}"))
        else:
            flat[key] = value
    return flat
