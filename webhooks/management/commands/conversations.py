"""`manage.py conversations`: list chats, pause, resume and reset the bot in one."""

import json
from typing import Annotated, Any

import typer
from django_typer.management import TyperCommand, command

from instances.cli import fail, render_table
from webhooks.models import Conversation
from webhooks.selectors import filter_conversations
from webhooks.serializers import ConversationSerializer
from webhooks.transitions import pause_conversation, reset_conversation, resume_conversation

IdArg = Annotated[int, typer.Argument(help="The conversation's id (see `list`).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON and nothing else.")]


class Command(TyperCommand):
    help = "The chats of every instance: list them; pause, resume or reset the bot in one."

    @command(name="list")
    def list_conversations(
        self,
        instance: Annotated[
            str | None, typer.Option("--instance", help="Only this instance's chats.")
        ] = None,
        state: Annotated[str | None, typer.Option("--state", help="active or paused.")] = None,
        limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
        as_json: Json = False,
    ) -> None:
        """List chats, most recent first."""
        if state not in (None, "active", "paused"):
            fail(self, "error: --state must be active or paused.")
        queryset = filter_conversations(
            Conversation.objects.select_related("instance", "bound_agent"),
            {"instance": instance, "state": state},
        )[:limit]
        data = ConversationSerializer(queryset, many=True).data
        if as_json:
            self._print_json(data)
            return
        if not data:
            self.echo("No conversations.")
            return
        headers = ["ID", "INSTANCE", "CHAT", "NAME", "STATE", "AGENT", "SESSION", "LAST MESSAGE"]
        rows = [
            [
                str(item["id"]),
                item["instance"],
                item["phone"] or item["chat_jid"],
                item["name"] or "-",
                _state(item),
                item["agent"],
                item["session_name"],
                _time(item["last_message_at"]),
            ]
            for item in data
        ]
        self.echo(render_table(headers, rows))

    @command()
    def pause(
        self,
        conversation_id: IdArg,
        minutes: Annotated[
            int | None,
            typer.Option("--minutes", min=1, help="For this long; without it, until resumed."),
        ] = None,
        as_json: Json = False,
    ) -> None:
        """Pause the bot in a chat."""
        conversation = pause_conversation(conversation=self._get(conversation_id), minutes=minutes)
        self._report(conversation, "Paused the bot in", as_json=as_json)

    @command()
    def resume(self, conversation_id: IdArg, as_json: Json = False) -> None:
        """Let the bot answer in a chat again at once."""
        conversation = resume_conversation(conversation=self._get(conversation_id))
        self._report(conversation, "Resumed the bot in", as_json=as_json)

    @command()
    def reset(self, conversation_id: IdArg, as_json: Json = False) -> None:
        """Start a new agent session for a chat."""
        conversation = reset_conversation(conversation=self._get(conversation_id))
        self._report(conversation, "Reset", as_json=as_json)

    # --- helpers (not subcommands) ---
    def _get(self, conversation_id: int) -> Conversation:
        try:
            return Conversation.objects.select_related("instance", "bound_agent").get(
                pk=conversation_id
            )
        except Conversation.DoesNotExist:
            fail(self, f"error: no conversation {conversation_id} (see `conversations list`).")

    def _report(self, conversation: Conversation, done: str, *, as_json: bool) -> None:
        data = ConversationSerializer(conversation).data
        if as_json:
            self._print_json(data)
            return
        self.echo(
            f"{done} the chat {data['phone'] or data['chat_jid']} of {data['instance']}: "
            f"{_state(data)}, session {data['session_name']}."
        )

    def _print_json(self, data: Any) -> None:
        self.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _time(value: str | None) -> str:
    return value[:16].replace("T", " ") if value else "-"


def _state(item: dict[str, Any]) -> str:
    if item["state"] != "paused":
        return "active"
    until = item["paused_until"]
    reason = item["pause_reason"]
    return f"paused ({reason}, until {_time(until)})" if until else f"paused ({reason})"
