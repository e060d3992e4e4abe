"""Who may call which REST operation: the one permission class of the whole API.

- The operator's key (header x-api-key, OMNIHUB_API_KEY) may do everything.
- A staff user (their DRF token or an admin session) needs Django's model
  permissions, the ones the admin uses: list and retrieve need
  ``<app>.view_<model>``, create ``add_``, update ``change_``, delete ``delete_``
  (the model is the viewset's queryset's).
- An instance's send key (header x-api-key, omnihub_send_…) may call the send
  endpoint of its own instance, whose view uses SendKeyPermission, and nothing
  else: 403 on every other operation.
- Anyone else, a logged-in user who is not staff included, gets 401.

A custom action (``@action``) declares its permissions in the viewset's
``action_permissions``, keyed by the action's name (the method's name); a
view that is not a viewset keys it by HTTP method ("get", "post"...). An
action it does not list is refused to staff users, so a new action cannot
be open by mistake. The schema (instances/schema.py) documents each
operation's 403 with the permissions it needs. E.g. a conversations API in webhooks/:

    class ConversationViewSet(viewsets.GenericViewSet):
        queryset = Conversation.objects.all()
        # HubPermission is REST_FRAMEWORK's default permission class: nothing to set.
        action_permissions = {"hand_over": ["webhooks.manage_conversation"]}

        @action(detail=True, methods=["post"], url_path="hand-over")
        def hand_over(self, request, **kwargs): ...

A permission is declared in its model's ``Meta.permissions`` (which needs a
migration) and granted in the admin (Users or Groups).
"""

from collections.abc import Mapping, Sequence
from typing import Any

from rest_framework import exceptions, permissions, status
from rest_framework.request import Request

from instances.authentication import ApiKeyUser, SendKeyUser

# What each of the viewsets' standard actions does to the model.
MODEL_ACTIONS = {
    "list": "view",
    "retrieve": "view",
    "metadata": "view",  # OPTIONS
    "create": "add",
    "update": "change",
    "partial_update": "change",
    "destroy": "delete",
}


class MissingPermission(exceptions.PermissionDenied):
    """A staff user without the permission the operation needs: 403, not 401."""

    status_code = status.HTTP_403_FORBIDDEN


def required_permissions(*, view: Any) -> list[str] | None:
    """The permissions a staff user needs for the view's current action; None: refused."""
    action = getattr(view, "action", None)
    request = getattr(view, "request", None)
    if action is None and request is not None:
        action = request.method.lower()  # an APIView: no action, one method each
    declared: Mapping[str, Sequence[str]] = getattr(view, "action_permissions", {})
    if action in declared:
        return list(declared[action])
    if action not in MODEL_ACTIONS:
        return None
    # The class attribute, not get_queryset(): that may validate the request's
    # filters, which must not run (or fail) before the caller is authorised.
    queryset = getattr(view, "queryset", None)
    model = queryset.model if queryset is not None else view.get_queryset().model
    opts = model._meta
    return [f"{opts.app_label}.{MODEL_ACTIONS[action]}_{opts.model_name}"]


def missing_permission_message(perms: Sequence[str] | None) -> str:
    if not perms:
        return "No permission allows this operation to staff users; use the API key."
    return f"This operation needs the permission {', '.join(perms)}."


SEND_KEY_ONLY_SENDS = (
    "A send key may only send messages through its own instance "
    "(POST /api/v1/instances/{name}/messages/)."
)
# The URL keyword naming the instance: a nested route's, or InstanceViewSet's lookup.
INSTANCE_KWARGS = ("instance_name", "name")


class HubPermission(permissions.BasePermission):
    message = "Send header x-api-key, a staff user's token, or log in as staff."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if isinstance(user, ApiKeyUser):
            return True
        if isinstance(user, SendKeyUser):
            raise MissingPermission(SEND_KEY_ONLY_SENDS)
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            # DRF raises PermissionDenied, which api_errors turns into 401.
            return False
        if not hasattr(view, request.method.lower()):
            # What DRF would answer next; not "no permission" for a method that is not there.
            raise exceptions.MethodNotAllowed(request.method)
        perms = required_permissions(view=view)
        if perms is None or not user.has_perms(perms):
            raise MissingPermission(missing_permission_message(perms))
        return True


def instance_named_by(view: Any) -> str | None:
    kwargs = getattr(view, "kwargs", None) or {}
    for name in INSTANCE_KWARGS:
        if name in kwargs:
            return str(kwargs[name])
    return None


class SendKeyPermission(HubPermission):
    """The send endpoint's permission: HubPermission's callers as everywhere, and
    also a send key of the instance the URL names (POST only; another instance's
    key, or any other method: 403).

    Used by the send view only: ``permission_classes = [SendKeyPermission]``.
    """

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if not isinstance(user, SendKeyUser):
            return super().has_permission(request, view)
        if request.method != "POST":
            raise MissingPermission(SEND_KEY_ONLY_SENDS)
        if instance_named_by(view) != user.instance_name:
            raise MissingPermission("This send key belongs to another instance.")
        return True


class SendPermission(SendKeyPermission):
    """Who may send through an instance and read its sends (the send API,
    webhooks/api_outbox.py): the one check of those views. The operator's key; a
    staff user with ``webhooks.add_outboundmessage`` (send) /
    ``webhooks.view_outboundmessage`` (list, retrieve); and a send key of the
    instance the URL names, to send only (SendKeyPermission).
    """
