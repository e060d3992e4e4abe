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
    if response is not None and isinstance(exc, exceptions.NotAuthenticated):
        response.status_code = 401
        response["WWW-Authenticate"] = "x-api-key"
    return response
