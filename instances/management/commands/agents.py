"""`manage.py agents`: an instance's other agents (the ones its routing rules choose)."""

import json
from typing import Annotated, Any

import typer
from django.core.exceptions import ValidationError
from django_typer.management import TyperCommand, command

from instances import services
from instances.cli import fail, render_table, validation_error_lines
from instances.models import AGENT_FIELDS, MAX_AGENT_TIMEOUT, Agent, InstanceConfig

InstanceArg = Annotated[str, typer.Argument(help="The instance's name.", show_default=False)]
NameArg = Annotated[str, typer.Argument(help="The agent's name.", show_default=False)]
Json = Annotated[
    bool, typer.Option("--json", help="Print JSON (the key as has_agent_api_key) and nothing else.")
]
AgentKind = Annotated[
    str | None, typer.Option("--agent-kind", help="automagik, openai or webhook.")
]
AgentApiUrl = Annotated[str | None, typer.Option("--agent-api-url", help="Agent API URL.")]
AgentApiKey = Annotated[str | None, typer.Option("--agent-api-key", help="Agent API key.")]
DefaultAgent = Annotated[
    str | None,
    typer.Option("--default-agent", help="automagik: the agent's name; openai: the model."),
]
SystemPrompt = Annotated[
    str | None, typer.Option("--system-prompt", help="openai only: the system message.")
]
# Strings, converted by the model fields, so a bad value gets the model's message.
AgentTimeout = Annotated[
    str | None,
    typer.Option("--agent-timeout", metavar="SECONDS", help=f"1 to {MAX_AGENT_TIMEOUT} seconds."),
]
HistoryLimit = Annotated[
    str | None,
    typer.Option("--history-limit", metavar="N", help="openai only: earlier messages sent."),
]


def agent_to_dict(agent: Agent) -> dict[str, Any]:
    data: dict[str, Any] = {"name": agent.name}
    for name in AGENT_FIELDS:
        value = getattr(agent, name)
        if name == "agent_api_key":
            data["has_agent_api_key"] = bool(value)
        else:
            data[name] = value
    return data


class Command(TyperCommand):
    help = (
        "Manage an instance's other agents: list, add, update, delete. The instance's own "
        "agent fields stay its default agent; routing rules (`manage.py routes`) choose these."
    )

    @command(name="list")
    def list_agents(self, instance: InstanceArg, as_json: Json = False) -> None:
        """List the instance's agents."""
        agents = list(self._instance(instance).agents.order_by("name"))
        if as_json:
            self.echo(json.dumps([agent_to_dict(a) for a in agents], indent=2))
            return
        if not agents:
            self.echo(f"Instance '{instance}' has no other agents.")
            return
        headers = ["NAME", "KIND", "URL", "AGENT", "KEY"]
        rows = [
            [
                a.name,
                a.agent_kind,
                a.agent_api_url,
                a.default_agent,
                "set" if a.agent_api_key else "not set",
            ]
            for a in agents
        ]
        self.echo(render_table(headers, rows))

    @command()
    def add(
        self,
        instance: InstanceArg,
        name: Annotated[str, typer.Option("--name", help="Letters, digits, '_', '-'.")],
        agent_kind: AgentKind = None,
        agent_api_url: AgentApiUrl = None,
        agent_api_key: AgentApiKey = None,
        default_agent: DefaultAgent = None,
        system_prompt: SystemPrompt = None,
        agent_timeout: AgentTimeout = None,
        history_limit: HistoryLimit = None,
        as_json: Json = False,
    ) -> None:
        """Add an agent to the instance."""
        agent = Agent(instance=self._instance(instance), name=name)
        self._apply(
            agent,
            agent_kind=agent_kind,
            agent_api_url=agent_api_url,
            agent_api_key=agent_api_key,
            default_agent=default_agent,
            system_prompt=system_prompt,
            agent_timeout=agent_timeout,
            history_limit=history_limit,
        )
        self._save(agent)
        if as_json:
            self.echo(json.dumps(agent_to_dict(agent), indent=2))
        else:
            self.echo(f"Added agent '{agent.name}' to instance '{instance}'.")

    @command()
    def update(
        self,
        instance: InstanceArg,
        name: NameArg,
        agent_kind: AgentKind = None,
        agent_api_url: AgentApiUrl = None,
        agent_api_key: AgentApiKey = None,
        default_agent: DefaultAgent = None,
        system_prompt: SystemPrompt = None,
        agent_timeout: AgentTimeout = None,
        history_limit: HistoryLimit = None,
        as_json: Json = False,
    ) -> None:
        """Change the given fields of an agent; the others keep their values."""
        agent = self._agent(instance, name)
        self._apply(
            agent,
            agent_kind=agent_kind,
            agent_api_url=agent_api_url,
            agent_api_key=agent_api_key,
            default_agent=default_agent,
            system_prompt=system_prompt,
            agent_timeout=agent_timeout,
            history_limit=history_limit,
        )
        self._save(agent)
        if as_json:
            self.echo(json.dumps(agent_to_dict(agent), indent=2))
        else:
            self.echo(f"Updated agent '{name}' of instance '{instance}'.")

    @command()
    def delete(self, instance: InstanceArg, name: NameArg) -> None:
        """Delete an agent no routing rule points at; its chats go back to the default agent."""
        agent = self._agent(instance, name)
        try:
            services.delete_agent(agent=agent)
        except ValidationError as exc:
            fail(self, *validation_error_lines(exc))
        self.echo(f"Deleted agent '{name}' of instance '{instance}'.")

    # --- helpers (not subcommands) ---
    def _instance(self, name: str) -> InstanceConfig:
        try:
            return InstanceConfig.objects.get(name=name)
        except InstanceConfig.DoesNotExist:
            fail(self, f"error: no instance named '{name}' (see `manage.py instances list`).")

    def _agent(self, instance: str, name: str) -> Agent:
        try:
            return self._instance(instance).agents.get(name=name)
        except Agent.DoesNotExist:
            fail(self, f"error: instance '{instance}' has no agent named '{name}'.")

    def _apply(self, agent: Agent, **fields: Any) -> None:
        """Set the fields that were given; None means "not given"."""
        errors: dict[str, list[str]] = {}
        for field, value in fields.items():
            if value is None:
                continue
            try:
                value = Agent._meta.get_field(field).to_python(value)
            except ValidationError as exc:
                errors[field] = exc.messages
            setattr(agent, field, value)
        if errors:
            fail(self, *validation_error_lines(ValidationError(errors)))

    def _save(self, agent: Agent) -> None:
        try:
            services.save_agent(agent=agent)
        except ValidationError as exc:
            fail(self, *validation_error_lines(exc))
