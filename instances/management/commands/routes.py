"""`manage.py routes`: an instance's routing rules, tried in position order."""

import json
from typing import Annotated, Any

import typer
from django.core.exceptions import ValidationError
from django_typer.management import TyperCommand, command

from instances import services
from instances.cli import fail, render_table, validation_error_lines
from instances.models import InstanceConfig, Route, RouteMatch

InstanceArg = Annotated[str, typer.Argument(help="The instance's name.", show_default=False)]
IdArg = Annotated[int, typer.Argument(help="The rule's id (see `list`).", show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON and nothing else.")]
Match = Annotated[
    str | None, typer.Option("--match", help=f"One of {', '.join(RouteMatch.values)}.")
]
Value = Annotated[
    str | None,
    typer.Option("--value", help="The keyword, prefix, text, regular expression or chat."),
]
AgentName = Annotated[
    str | None,
    typer.Option("--agent", help="An agent's name (`manage.py agents list`), or 'default'."),
]
# A string, converted by the model field, so a bad value gets the model's message.
Position = Annotated[
    str | None,
    typer.Option("--position", metavar="N", help="Lowest first; omitted: after the last rule."),
]


def route_to_dict(route: Route) -> dict[str, Any]:
    return {
        "id": route.pk,
        "position": route.position,
        "match": route.match,
        "value": route.value,
        "agent": route.agent_name,
    }


class Command(TyperCommand):
    help = (
        "Manage an instance's routing rules: list, add, update, delete. The first rule that "
        "matches a message answers it with its agent and keeps the chat there until a reset "
        "or an idle expiry."
    )

    @command(name="list")
    def list_routes(self, instance: InstanceArg, as_json: Json = False) -> None:
        """List the instance's rules in the order they are tried."""
        routes = list(self._instance(instance).routes.select_related("agent"))
        if as_json:
            self.echo(json.dumps([route_to_dict(r) for r in routes], indent=2))
            return
        if not routes:
            self.echo(f"Instance '{instance}' has no routing rules.")
            return
        rows = [[str(r.pk), str(r.position), r.match, r.value, r.agent_name] for r in routes]
        self.echo(render_table(["ID", "POSITION", "MATCH", "VALUE", "AGENT"], rows))

    @command()
    def add(
        self,
        instance: InstanceArg,
        match: Match = None,
        value: Value = None,
        agent: AgentName = "default",
        position: Position = None,
        as_json: Json = False,
    ) -> None:
        """Add a rule (after the last one unless --position says where)."""
        route = Route(instance=self._instance(instance), match=match or "", value=value or "")
        self._apply(route, agent=agent, position=position)
        self._save(route)
        if as_json:
            self.echo(json.dumps(route_to_dict(route), indent=2))
        else:
            self.echo(f"Added rule {route.pk} at position {route.position}: {route}.")

    @command()
    def update(
        self,
        instance: InstanceArg,
        route_id: IdArg,
        match: Match = None,
        value: Value = None,
        agent: AgentName = None,
        position: Position = None,
        as_json: Json = False,
    ) -> None:
        """Change the given fields of a rule; the others keep their values."""
        route = self._route(instance, route_id)
        if match is not None:
            route.match = match
        if value is not None:
            route.value = value
        self._apply(route, agent=agent, position=position)
        self._save(route)
        if as_json:
            self.echo(json.dumps(route_to_dict(route), indent=2))
        else:
            self.echo(f"Updated rule {route.pk}: position {route.position}, {route}.")

    @command()
    def delete(self, instance: InstanceArg, route_id: IdArg) -> None:
        """Delete a rule (chats it bound stay with their agent until a reset or idle expiry)."""
        self._route(instance, route_id).delete()
        self.echo(f"Deleted rule {route_id} of instance '{instance}'.")

    # --- helpers (not subcommands) ---
    def _instance(self, name: str) -> InstanceConfig:
        try:
            return InstanceConfig.objects.get(name=name)
        except InstanceConfig.DoesNotExist:
            fail(self, f"error: no instance named '{name}' (see `manage.py instances list`).")

    def _route(self, instance: str, route_id: int) -> Route:
        try:
            return self._instance(instance).routes.get(pk=route_id)
        except Route.DoesNotExist:
            fail(self, f"error: instance '{instance}' has no routing rule {route_id}.")

    def _apply(self, route: Route, *, agent: str | None, position: str | None) -> None:
        try:
            if agent is not None:
                route.agent = services.agent_named(instance=route.instance, name=agent)
        except ValidationError as exc:
            fail(self, *validation_error_lines(exc))
        if position is not None:
            try:
                route.position = Route._meta.get_field("position").to_python(position)
            except ValidationError as exc:
                fail(self, *validation_error_lines(ValidationError({"position": exc.messages})))

    def _save(self, route: Route) -> None:
        try:
            services.save_route(route=route)
        except ValidationError as exc:
            fail(self, *validation_error_lines(exc))
