"""API authentication: the operator's API key, a staff token, or a staff session.

What each may do is decided in instances/permissions.py.
"""

import hmac

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

API_KEY_HEADER = "x-api-key"


class ApiKeyUser(AnonymousUser):
    """The caller holding OMNIHUB_API_KEY: no Django user, full API access."""

    @property
    def is_authenticated(self) -> bool:  # type: ignore[override]
        return True

    def __str__(self) -> str:
        return "api-key"


def api_key_matches(given: str | None) -> bool:
    expected = settings.OMNIHUB_API_KEY
    if not expected or not given:
        # No key configured: the key method is off, not open.
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[ApiKeyUser, None] | None:
        given = request.headers.get(API_KEY_HEADER)
        if given is None:
            return None
        if not api_key_matches(given):
            raise exceptions.AuthenticationFailed("Invalid API key.")
        return ApiKeyUser(), None

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (not 403) to unauthenticated calls.
        return API_KEY_HEADER
