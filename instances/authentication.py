"""API authentication: the operator's API key, a staff token, or a staff session;
and an instance's send keys (omnihub_send_…, in the same header), which may only send.

What each may do is decided in instances/permissions.py.
"""

import hmac

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from instances.models import SendKey
from instances.send_keys import find_send_key, is_send_key

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
        if is_send_key(given):
            # SendKeyAuthentication's (next in REST_FRAMEWORK's list).
            return None
        if not api_key_matches(given):
            raise exceptions.AuthenticationFailed("Invalid API key.")
        return ApiKeyUser(), None

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (not 403) to unauthenticated calls.
        return API_KEY_HEADER


class SendKeyUser(AnonymousUser):
    """The caller holding one of an instance's send keys: it may send messages
    through that instance and do nothing else (instances/permissions.py)."""

    def __init__(self, send_key: SendKey) -> None:
        super().__init__()
        self.send_key = send_key
        self.instance_id = send_key.instance_id
        self.instance_name = send_key.instance.name

    @property
    def is_authenticated(self) -> bool:  # type: ignore[override]
        return True

    def __str__(self) -> str:
        return f"send-key:{self.send_key.pk}"


class SendKeyAuthentication(BaseAuthentication):
    """Header x-api-key holding an instance's send key (omnihub_send_…)."""

    def authenticate(self, request: Request) -> tuple[SendKeyUser, SendKey] | None:
        given = request.headers.get(API_KEY_HEADER)
        if given is None or not is_send_key(given):
            return None
        send_key = find_send_key(given)
        if send_key is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked send key.")
        return SendKeyUser(send_key), send_key

    def authenticate_header(self, request: Request) -> str:
        return API_KEY_HEADER
