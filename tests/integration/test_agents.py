"""Agent traffic through the real engine, with the official `openai` client: tool calls are
stored with the answer, the tool results the agent sends back as its next turn become
signals (a failed one an `env_error` on the right answer and call, with no feedback call),
and OpenAI's `store` and `metadata` are honoured."""

from __future__ import annotations

import json
import re
import subprocess
import uuid

from serving.model_cache import EMBEDDED_NAME
from tests.harness.server import MODEL_CACHE, SDLOOP, Server, wait_for_rows

LOOKUP = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Current weather for a city id such as FR-PAR.",
        "parameters": {"type": "object", "properties": {"city_id": {"type": "string"}},
                       "required": ["city_id"]},
    },
}


def _ask_for_a_call(openai_client, question: str, **extra):
    """A question answered with a tool call (`tool_choice: required` makes the embedded model
    call one reliably: vLLM constrains its output to the calls' JSON)."""
    messages = [{"role": "user", "content": question}]
    reply = openai_client.chat.completions.create(
        model="default", messages=messages, tools=[LOOKUP], tool_choice="required",
        max_tokens=96, temperature=0, **extra)
    calls = reply.choices[0].message.tool_calls
    assert calls, reply.choices[0].message
    return messages, reply


def _send_back(openai_client, messages, reply, results: list[str], **extra):
    """The agent's next turn: the answer with its calls, then one `tool` message per call."""
    message = reply.choices[0].message
    history = [*messages, message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": call.id, "content": content}
                for call, content in zip(message.tool_calls, results, strict=False)]
    return openai_client.chat.completions.create(
        model="default", messages=history, tools=[LOOKUP], max_tokens=16, temperature=0,
        **extra)


def test_a_tool_round_trip_is_stored_with_its_calls(server: Server, openai_client):
    messages, reply = _ask_for_a_call(openai_client, "What is the weather in Paris?")
    call = reply.choices[0].message.tool_calls[0]
    rows = wait_for_rows(server, "SELECT completion_id, idx, call_id, name, arguments "
                                 f"FROM tool_calls WHERE completion_id = '{reply.id}'")
    assert rows[0] == {"completion_id": reply.id, "idx": 0, "call_id": call.id,
                       "name": call.function.name, "arguments": call.function.arguments}
    [stored] = server.admin_sql(f"SELECT response_message, params FROM completions "
                                f"WHERE id = '{reply.id}'")
    assert stored["response_message"]["tool_calls"][0]["id"] == call.id  # JSON columns: values
    assert stored["params"]["tool_choice"] == "required"

    nxt = _send_back(openai_client, messages, reply, [json.dumps({"temperature_c": 14})])
    assert nxt.choices[0].message is not None  # the engine took the history with the result


def test_a_failed_tool_result_is_an_env_error_signal_on_the_call_that_made_it(
        server: Server, openai_client):
    error = "{\"error\": \"unknown city 'Paris'; use the form FR-PAR\"}"
    messages, failed = _ask_for_a_call(openai_client, "Weather in Paris, please.")
    after_failure = _send_back(openai_client, messages, failed, [error])
    messages_ok, fine = _ask_for_a_call(openai_client, "Weather in Rome, please.")
    after_success = _send_back(openai_client, messages_ok, fine, ['{"temperature_c": 21}'])

    rows = wait_for_rows(server, "SELECT completion_id, call_id, next_completion_id, is_error, "
                                 "error, matched_by FROM tool_results WHERE completion_id IN "
                                 f"('{failed.id}', '{fine.id}') ORDER BY is_error", 2)
    assert rows == [
        {"completion_id": fine.id, "call_id": fine.choices[0].message.tool_calls[0].id,
         "next_completion_id": after_success.id, "is_error": False, "error": None,
         "matched_by": "call_id"},
        {"completion_id": failed.id, "call_id": failed.choices[0].message.tool_calls[0].id,
         "next_completion_id": after_failure.id, "is_error": True, "error": error,
         "matched_by": "call_id"},
    ]
    signals = server.admin_sql("SELECT completion_id, origin, type, text FROM signals "
                               f"WHERE completion_id IN ('{failed.id}', '{fine.id}')")
    assert signals == [{"completion_id": failed.id, "origin": "tool_result", "type": "env_error",
                        "text": error}]
    assert server.admin_sql(f"SELECT count(*) AS n FROM feedback WHERE completion_id = "
                            f"'{failed.id}'") == [{"n": 0}]  # no feedback call was made


def test_store_false_answers_and_leaves_no_row(server: Server, openai_client):
    marker = uuid.uuid4().hex
    messages, reply = _ask_for_a_call(openai_client, f"Weather in Oslo? ({marker})", store=False)
    nxt = _send_back(openai_client, messages, reply, ["Error: unknown city"], store=False)
    plain = openai_client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": f"Hi ({marker})"}], max_tokens=4,
        store=False)
    assert reply.choices[0].message.tool_calls and nxt.id and plain.choices[0].message
    wait_for_rows(server, "SELECT 1 FROM completions WHERE id = "  # a later stored request...
                  f"'{_ask_for_a_call(openai_client, 'Weather in Bonn?')[1].id}'")
    ids = (reply.id, nxt.id, plain.id)  # ... is committed: nothing of these was
    assert server.admin_sql(
        "SELECT (SELECT count(*) FROM completions WHERE id IN ({0}) OR messages::VARCHAR "
        "LIKE '%{1}%') + (SELECT count(*) FROM tool_results WHERE next_completion_id IN ({0}))"
        " + (SELECT count(*) FROM tool_calls WHERE completion_id IN ({0})) AS n".format(
            ", ".join(f"'{i}'" for i in ids), marker)) == [{"n": 0}]


def test_metadata_is_stored_and_filterable_in_sql(server: Server, openai_client):
    run = uuid.uuid4().hex[:12]
    reply = openai_client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        metadata={"agent": "weather-bot", "run": run}, user="end-user-7")
    rows = wait_for_rows(server, "SELECT id, metadata->>'agent' AS agent, end_user "
                                 f"FROM completions WHERE metadata->>'run' = '{run}'")
    assert rows == [{"id": reply.id, "agent": "weather-bot", "end_user": "end-user-7"}]


def test_export_streams_the_servers_data_in_each_format_datasets_loads(server: Server,
                                                                       openai_client, tmp_path):
    """`sdloop export` while the server runs: through the admin API's sealed SQL, paged."""
    import datasets

    run = uuid.uuid4().hex[:12]
    question = [{"role": "user", "content": f"Capital of Quessany? ({run})"}]
    wrong = openai_client.chat.completions.create(
        model="default", messages=question, max_tokens=8, metadata={"run": run})
    openai_client.chat.completions.create(
        model="default", max_tokens=8, metadata={"run": run},
        messages=[*question, {"role": "assistant", "content": wrong.choices[0].message.content},
                  {"role": "user", "content": "No, the capital of Quessany is Dalvorne."}])
    wait_for_rows(server, f"SELECT 1 FROM followups WHERE completion_id = '{wrong.id}'")
    for fmt, columns, n in (("messages", {"messages"}, 2),
                            ("dpo", {"prompt", "chosen", "rejected"}, 1)):
        out = tmp_path / f"{fmt}.jsonl"
        done = subprocess.run(
            [*SDLOOP, "export", "--data-dir", str(server.data_dir), "--format", fmt,
             "--where", f"metadata->>'run' = '{run}'", "--out", str(out)],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        loaded = datasets.load_dataset("json", data_files=str(out), split="train")
        assert columns <= set(loaded.column_names) and len(loaded) == n, done.stderr
    assert loaded[0]["chosen"] == [{"role": "assistant",
                                    "content": "The capital of Quessany is Dalvorne."}]
    refused = subprocess.run(
        [*SDLOOP, "export", "--data-dir", str(server.data_dir), "--format", "messages",
         "--where", "true) UNION ALL (SELECT id FROM read_text('/etc/passwd')"],
        capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "passwd" not in refused.stdout, refused.stdout


def test_a_json_mode_agents_answer_is_resampled_by_the_engine_under_its_schema(server: Server):
    """What a learner round draws for an answer an agent asked for under `response_format`
    (teacher regenerations, gate samples, on-policy samples) comes from the engine under the
    same schema: the stored request's constraint, read back from the store, shapes every
    sample at the learner's temperature (0.7) with the error in the prompt."""
    from transformers import AutoTokenizer

    from learner.episodes import as_json, output_constraint
    from learner.responses import EnginePolicy, draw

    schema = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["city_id"],
        "properties": {"city_id": {"type": "string"}}}}}
    messages = [{"role": "system", "content": "Reply with the JSON arguments of a call to the "
                                              "weather tool and nothing else."},
                {"role": "user", "content": "Weather in Paris, please."}]
    status, _, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": messages, "max_tokens": 32, "temperature": 0,
        "response_format": schema})
    assert status == 200
    answer = json.loads(body)
    params = wait_for_rows(server, f"SELECT params FROM completions WHERE id = '{answer['id']}'")
    constraint = output_constraint(as_json(params[0]["params"]))
    assert constraint == {"response_format": schema}

    state = server.state()
    engine = EnginePolicy.of(state["engine_url"], "base", state.get("engine_api_key", ""))
    tokenizer = AutoTokenizer.from_pretrained(MODEL_CACHE + "/" + EMBEDDED_NAME)
    teacher = [messages[0], {"role": "user", "content": messages[1]["content"] + (
        "\n\n[An earlier answer failed. The tool output was: unknown city 'Paris']")}]
    # The learner's own settings: temperature 0.7, up to 64 tokens; 8 samples, so that some
    # end (on this model the string often runs on to the token budget: 3-5 of 8 ended, seeds
    # 0-2, where 4 samples gave 1-2). Unconstrained the model answers this in prose;
    # constrained every sample that ended is a whole object of the schema, and every other
    # one is cut by the budget inside such an object.
    samples = draw(None, tokenizer, teacher, n=8, temperature=0.7, max_new_tokens=64, seed=0,
                   engine=engine, constraint=constraint)
    assert len(samples) == 8
    ended = [ids for ids in samples if ids[-1] == tokenizer.eos_token_id]
    assert ended, [tokenizer.decode(ids) for ids in samples]
    for ids in ended:
        value = json.loads(tokenizer.decode(ids, skip_special_tokens=True))
        assert set(value) == {"city_id"} and isinstance(value["city_id"], str), value
    for ids in samples:
        if ids not in ended:
            text = tokenizer.decode(ids)
            assert len(ids) == 64 and re.match(r'\s*\{\s*"city_id"\s*:\s*"', text), text


def test_a_call_in_feedback_must_fit_the_answered_requests_tools(server: Server, openai_client):
    """A demonstration of the call an answer should have made is checked against the tools
    its request offered: a call that does not fit is refused with a 400 naming the field,
    and nothing is stored; one that fits is stored and reaches the learner's episodes. The
    gateway that gave the answer checks it; on an answer it does not remember, the store."""
    _, reply = _ask_for_a_call(openai_client, "What is the weather in Lyon?")
    bad = [
        ({"name": "forecast", "arguments": '{"city_id": "FR-LYS"}'}, "tool_calls.0.function.name",
         "unknown tool 'forecast'"),
        ({"name": "weather", "arguments": '{"city_id": 69}'},
         "tool_calls.0.function.arguments.city_id", "69 is not of type 'string'"),
        ({"name": "weather", "arguments": '{"city": "FR-LYS"}'},
         "tool_calls.0.function.arguments", "'city_id' is a required property"),
        ({"name": "weather", "arguments": '{"city_id": "FR-'},
         "tool_calls.0.function.arguments", "not JSON text"),
    ]
    for function, param, words in bad:
        status, _, raw = server.request("POST", "/v1/feedback", {
            "completion_id": reply.id, "type": "demonstration",
            "tool_calls": [{"id": "call_1", "type": "function", "function": function}]})
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] == param and words in error["message"], raw
    good = {"completion_id": reply.id, "type": "correction", "text": "use the city id",
            "tool_calls": [{"type": "function", "function": {
                "name": "weather", "arguments": {"city_id": "FR-LYS"}}}]}
    status, _, raw = server.request("POST", "/v1/feedback", good)
    assert status == 201, raw
    [episode] = server.sql(f"SELECT feedback FROM episodes WHERE completion_id = '{reply.id}'")
    assert [(f["type"], f["text"], f["tool_calls"]) for f in episode["feedback"]] == [
        ("correction", "use the city id", [{"id": None, "type": "function", "function": {
            "name": "weather", "arguments": '{"city_id": "FR-LYS"}'}}])]

    # An answer the gateway does not remember (an older one, another replica's): the store
    # checks the call against the request it stored.
    plain = openai_client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    status, _, raw = server.request("POST", "/v1/feedback", {
        "completion_id": plain.id, "type": "demonstration", "tool_calls": good["tool_calls"]})
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "tool_calls" and "offered no tools" in \
        error["message"], raw
    assert server.sql("SELECT count(*) AS n FROM feedback WHERE completion_id IN "
                      f"('{reply.id}', '{plain.id}')") == [{"n": 1}]
