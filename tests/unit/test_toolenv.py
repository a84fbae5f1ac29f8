"""The tool benchmark's environment: calls that are schema-valid yet wrong fail with an error that
says what to fix, and held-out instances are never among the training ones."""

import json

from ops.bench.toolenv import TOOLS, load_tasks, split, system_prompt


def test_a_call_naming_the_entity_in_another_form_fails_and_says_what_would_work():
    weather = TOOLS["weather"]
    worked, result = weather.call("New York", {"city_id": "New York"}, ["Paris", "New York"])
    assert not worked
    assert "city:rio-de-janeiro" in result["error"]  # the form, by another instance
    assert result["error"].endswith("did you mean 'city:new-york'?")
    assert weather.call("New York", {"city_id": "city:new-york"}, [])[0]


def test_an_unrecognisable_call_gets_the_form_only():
    worked, result = TOOLS["get_user"].call("Maria Lopez", {"username": "x123"}, ["Maria Lopez"])
    assert not worked and "first.last" in result["error"] and "did you mean" not in result["error"]
    worked, result = TOOLS["read_file"].call("todo.md", {"path": "docs/todo.md"}, ["todo.md"])
    assert not worked and result["error"].endswith("did you mean '/workspace/todo.md'?")


def test_arguments_of_the_wrong_shape_are_an_error_not_a_crash():
    for arguments in (None, [], {"city": "Paris"}, {"city_id": 3}):
        worked, result = TOOLS["weather"].call("Paris", arguments, ["Paris"])
        assert not worked and "city_id" in result["error"]


def test_echoing_the_entity_never_works_for_any_instance():
    for task in load_tasks():
        tool = TOOLS[task.tool]
        assert not tool.call(task.instance, {tool.argument: task.instance}, [])[0], task
        assert tool.call(task.instance, {tool.argument: tool.valid(task.instance)}, [])[0], task


def test_held_out_instances_are_disjoint_from_training_ones_and_fixed_by_the_seed():
    tasks = load_tasks()
    train, heldout = split(tasks, 0, 4, 6)
    assert len(train) == 4 * len(TOOLS) and len(heldout) == 6 * len(TOOLS)
    assert not {t.key for t in train} & {t.key for t in heldout}
    assert split(tasks, 0, 4, 6) == (train, heldout)
    assert split(tasks, 1, 4, 6) != (train, heldout)


def test_the_system_prompt_carries_the_schema_but_not_the_accepted_form():
    prompt = system_prompt(TOOLS["weather"])
    assert json.dumps(TOOLS["weather"].parameters) in prompt and "city:" not in prompt
