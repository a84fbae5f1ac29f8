"""The tool-use benchmark's environment: tools whose calls can be well-formed yet wrong.

Each tool takes one string argument under a JSON schema, and the schema says nothing about the
form the tool accepts: a weather lookup knows cities only by ids like `city:new-york`, a file
reader only absolute paths under `/workspace`, a user directory only `first.last` handles. A
call in any other form — "Paris", "notes.txt", "Maria Lopez", all schema-valid — fails with an
error that states the form with an example of *another* instance (a tool's documentation does
not know the caller's task), so what a model can learn from the error is the rule, not one answer.
These are the error classes; a task instance is one city, file or person, and held-out instances
of the same classes test whether the rule was learned rather than the answers.

Pure logic: the benchmark (`ops/bench/tools.py`) drives the agent loop against the endpoint.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS_FILE = Path(__file__).resolve().parent / "data" / "tool_tasks.json"


def _plain(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class Tool:
    """One tool: its OpenAI function definition, the argument it takes, the one value of that
    argument that works for an instance, and the error for any other."""

    name: str
    description: str
    argument: str
    argument_description: str
    # instance (the entity a task is about) -> the argument value the tool accepts
    valid: Callable[[str], str]
    # the value the caller gave -> the tool's error message (the form it accepts, by example)
    error: Callable[[str], str]
    # the tool's answer for a valid call
    answer: Callable[[str], dict[str, Any]]

    @property
    def parameters(self) -> dict[str, Any]:
        """The JSON schema of the arguments: well-formed says nothing about the accepted form."""
        return {"type": "object", "additionalProperties": False, "required": [self.argument],
                "properties": {self.argument: {"type": "string",
                                               "description": self.argument_description}}}

    @property
    def function(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}

    def call(self, instance: str, arguments: Any,
             known: list[str] = ()) -> tuple[bool, dict[str, Any]]:
        """Run the call for the task about `instance`: (worked, the tool's JSON result).

        `known`: every entity the tool has (its database). When the value given names one of
        them in another form, the error also says "did you mean" with its accepted form, as
        real tools do; otherwise it states the form only."""
        if not isinstance(arguments, dict) or not isinstance(arguments.get(self.argument), str):
            return False, {"error": f"expected a JSON object with a string '{self.argument}'"}
        given = arguments[self.argument]
        if given.strip() == self.valid(instance):
            return True, self.answer(instance)
        message = self.error(given)
        named = {_plain(given), _plain(given.rsplit("/", 1)[-1])}
        meant = next((k for k in known if _plain(k) in named), None)
        if meant is not None:
            message += f"; did you mean {self.valid(meant)!r}?"
        return False, {"error": message}


TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("weather", "Current weather for a city.", "city_id", "the city's id",
         valid=lambda city: f"city:{_slug(city)}",
         error=lambda given: (f"unknown city_id {given!r}: ids are 'city:' followed by the city's "
                              "name in lower case with hyphens for spaces, e.g. 'city:rio-de-janeiro'"),
         answer=lambda city: {"city": city, "temperature_c": 18, "sky": "clear"}),
    Tool("read_file", "Read a file of the user's project.", "path", "the file's path",
         valid=lambda name: f"/workspace/{name}",
         error=lambda given: (f"no such file {given!r}: paths are absolute, under /workspace, "
                              "e.g. '/workspace/setup.cfg'"),
         answer=lambda name: {"path": f"/workspace/{name}", "bytes": 512, "text": "..."}),
    Tool("get_user", "Look up a person's account in the company directory.", "username",
         "the person's username",
         valid=lambda person: ".".join(person.lower().split()),
         error=lambda given: (f"no user {given!r}: usernames are first.last in lower case, "
                              "e.g. 'jane.doe'"),
         answer=lambda person: {"name": person, "team": "research", "active": True}),
)}


@dataclass(frozen=True)
class Task:
    """One task instance: what the user asks, about which entity, with which tool."""

    tool: str
    instance: str
    ask: str

    @property
    def key(self) -> str:
        return f"{self.tool}:{self.instance}"


def system_prompt(tool: Tool) -> str:
    """The agent's instructions: the tool as a JSON-mode agent framework describes it to a model
    whose chat template does not render `tools` (the embedded model's does not)."""
    return (f"You are an assistant that can use one tool.\n"
            f"Tool: {tool.name}: {tool.description}\n"
            f"Arguments (JSON schema): {json.dumps(tool.parameters)}\n"
            "Reply with the JSON arguments of a call to the tool and nothing else.")


def load_tasks(path: Path = TASKS_FILE) -> list[Task]:
    """Every task instance of the task file: per tool, question templates and instances."""
    data = json.loads(path.read_text())
    tasks = []
    for tool, spec in data.items():
        if tool not in TOOLS:
            raise ValueError(f"{path}: no tool '{tool}' in the environment")
        for n, instance in enumerate(spec["instances"]):
            template = spec["asks"][n % len(spec["asks"])]
            tasks.append(Task(tool, instance, template.replace("{x}", instance)))
    return tasks


def split(tasks: list[Task], seed: int, train_per_tool: int,
          heldout_per_tool: int) -> tuple[list[Task], list[Task]]:
    """Per tool, `train_per_tool` instances the agent meets while deployed (the learner sees
    their failures) and `heldout_per_tool` others it is evaluated on; drawn with the seed."""
    rng = random.Random(seed)
    train, heldout = [], []
    for tool in TOOLS:
        mine = [t for t in tasks if t.tool == tool]
        if len(mine) < train_per_tool + heldout_per_tool:
            raise ValueError(f"tool {tool}: {len(mine)} instances, need "
                             f"{train_per_tool + heldout_per_tool}")
        picked = rng.sample(mine, train_per_tool + heldout_per_tool)
        train += picked[:train_per_tool]
        heldout += picked[train_per_tool:]
    return train, heldout
