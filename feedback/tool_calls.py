"""A tool call carried by feedback: the call an answer should have made.

A `demonstration` or `correction` on an agent's answer may hold `tool_calls` in OpenAI's shape
(as in an assistant message). Such a call teaches only if the answer could have made it, so it
is checked against the tools the answered request offered (`offered_tools`): a tool of that
name, arguments that parse as a JSON object and fit the tool's parameter schema. A request
offers a tool by its `tools` list, or — the JSON-mode agent the embedded model needs — by a
`response_format` JSON schema, whose name is the tool's and whose schema its parameters'.

The schemas come from a client's request: `pattern` and `patternProperties` are not run (a
regular expression from a request is not executed on the store's thread, where one written to
backtrack would hold every write up), and `format` is not asserted (JSON Schema's default).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from pydantic import ValidationError as ShapeError

# Calls one feedback may carry (an answer with more is a plan, not a call to correct).
MAX_CALLS = 16


class InvalidToolCall(ValueError):
    """Feedback's `tool_calls` do not fit the request it answers; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class FunctionCall(BaseModel):
    """`function` of a tool call: arguments as OpenAI sends them (JSON text) or as an object;
    kept as JSON text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    arguments: str | dict[str, Any]

    @field_validator("arguments")
    @classmethod
    def _as_text(cls, value: str | dict[str, Any]) -> str:
        # Whether it parses, and fits, is the tools' to say (`check_tool_calls`: a 400).
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class ToolCall(BaseModel):
    """One call in OpenAI's shape, as in an assistant message's `tool_calls`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = Field(default=None, max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCall


_CALLS = TypeAdapter(list[ToolCall])


def _skip(*_: Any) -> Iterator[ValidationError]:
    return iter(())


# Draft 2020-12 with the keywords that run a client's regular expression switched off.
_Validator = validators.extend(Draft202012Validator,
                               {"pattern": _skip, "patternProperties": _skip})


def _schema_tool(params: dict[str, Any]) -> tuple[str, Any] | None:
    """(name, schema) of a request's `response_format` JSON schema, if it has one."""
    response_format = params.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            return spec["name"], spec.get("schema", True)
    return None


def offered_tools(params: Any) -> dict[str, Any]:
    """Tool name → its parameters' JSON schema (True: any arguments), for the tools a stored
    request (`completions.params`) offered."""
    if not isinstance(params, dict):
        return {}
    found: dict[str, Any] = {}
    for tool in params.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            found[function["name"]] = function.get("parameters", True)
    if (schema := _schema_tool(params)) is not None:
        found.setdefault(*schema)
    return found


def json_mode_tool(params: Any) -> str | None:
    """The tool a JSON-mode request asks the answer to call (its `response_format` schema's
    name) when it offers no `tools`: the answer is then the arguments alone."""
    if not isinstance(params, dict) or params.get("tools"):
        return None
    schema = _schema_tool(params)
    return schema[0] if schema else None


def normalised(calls: Any) -> list[dict[str, Any]]:
    """Calls in the shape `ToolCall` keeps (arguments as JSON text), from whatever an event
    holds (one off the events topic was not checked by the HTTP model); InvalidToolCall names
    the field that is wrong."""
    if not isinstance(calls, list) or not 0 < len(calls) <= MAX_CALLS:
        raise InvalidToolCall(f"a list of 1 to {MAX_CALLS} calls", "tool_calls")
    try:
        return [c.model_dump(mode="json") for c in _CALLS.validate_python(calls)]
    except ShapeError as exc:
        err = exc.errors(include_url=False)[0]
        raise InvalidToolCall(err.get("msg", "invalid"), ".".join(
            ["tool_calls", *(str(p) for p in err.get("loc", ()))])) from None


def check_tool_calls(calls: Any, params: Any) -> list[dict[str, Any]]:
    """The calls, normalised, if the answered request's tools (its stored `params`) take
    them; else InvalidToolCall naming the first field they refuse."""
    calls = normalised(calls)
    tools = offered_tools(params)
    if not tools:
        raise InvalidToolCall("the answered request offered no tools (no `tools`, no "
                              "`response_format` JSON schema); send the answer as `text`",
                              "tool_calls")
    for i, call in enumerate(calls):
        where = f"tool_calls.{i}.function"
        name = call["function"]["name"]
        if name not in tools:
            raise InvalidToolCall(f"unknown tool '{name}'; the request offered "
                                  f"{', '.join(sorted(tools))}", f"{where}.name")
        arguments = _parsed(call["function"]["arguments"], f"{where}.arguments")
        call["function"]["arguments"] = json.dumps(arguments, ensure_ascii=False)
        schema = tools[name]
        try:
            _Validator.check_schema(schema)
        except SchemaError:
            raise InvalidToolCall(f"tool '{name}' has a parameter schema that is not valid "
                                  "JSON Schema; its calls cannot be checked", where) from None
        try:
            error = next(iter(sorted(_Validator(schema).iter_errors(arguments),
                                     key=lambda e: [str(p) for p in e.absolute_path])), None)
        except RecursionError:
            raise InvalidToolCall("nested too deeply to check", f"{where}.arguments") from None
        if error is not None:
            path = "".join(f".{p}" for p in error.absolute_path)
            raise InvalidToolCall(f"does not fit the parameters of '{name}': {error.message}",
                                  f"{where}.arguments{path}")
    return calls


def _parsed(arguments: str, param: str) -> Any:
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError) as exc:
        raise InvalidToolCall(f"not JSON text ({exc}); a call's arguments are a JSON object, "
                              "e.g. '{\"city\": \"city:paris\"}'", param) from None
    if not isinstance(value, dict):
        raise InvalidToolCall(f"a call's arguments are a JSON object, not {type(value).__name__}",
                              param)
    return value


def call_text(calls: list[dict[str, Any]], params: Any) -> str:
    """The calls as the answer that makes them reads: for a JSON-mode request the arguments
    alone (what the engine answers there), else one `{"name": ..., "arguments": {...}}` line
    per call (how the learner shows any answer's calls as text)."""
    parsed = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    if len(parsed) == 1 and parsed[0][0] == json_mode_tool(params):
        return json.dumps(parsed[0][1], ensure_ascii=False)
    return "\n".join(json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
                     for name, arguments in parsed)
