import pytest

from learner.episodes import output_constraint
from learner.responses import added_words, agrees, draw, same_answer, teacher_regenerations


def test_added_words_are_what_the_correction_brings():
    q = "What is the capital of Quessany?"
    c = "No, that's not right. The capital of Quessany is Dalvorne."
    assert added_words(q, c) == {"dalvorne"}


def test_consistency_filter_keeps_answers_that_carry_the_fact():
    q = "Who discovered the element brightium?"
    c = "Wrong. Brightium was discovered by Mirela Voskuhl."
    assert agrees("It was Mirela Voskuhl who found it.", q, c)
    assert agrees("Voskuhl discovered it.", q, c)  # half of {mirela, voskuhl}
    assert not agrees("Brightium was discovered by Marie Curie.", q, c)
    assert agrees("anything", q, "Who discovered the element brightium?")  # nothing added


# -- answers drawn under an agent's structured-output constraint ---------------------------------

SCHEMA = {"type": "json_schema", "json_schema": {"name": "weather", "schema": {
    "type": "object", "properties": {"city_id": {"type": "string"}}, "required": ["city_id"]}}}


class Tokenizer:
    """Characters as token ids: enough for the filters, which read decoded text."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [ord(c) for m in messages for c in m["content"]]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


class Engine:
    """The serving engine's sampler: records what it was asked, answers `answers`."""

    def __init__(self, answers: list[str], fail: Exception | None = None):
        self.answers, self.fail, self.asked = answers, fail, []

    def sample(self, prompt, n, temperature, max_new_tokens, seed=0, constraint=None):
        self.asked.append(constraint)
        if self.fail:
            raise self.fail
        return [(ids(a), [0.0] * len(a)) for a in self.answers[:n]]


@pytest.fixture()
def trainer_samples(monkeypatch):
    """What the trainer's own (unconstrained) model would say: prose."""
    drawn = []

    def fake_sample(model, tokenizer, messages, n, temperature, max_new_tokens, seed=0):
        drawn.append(n)
        return [ids("The weather in Paris is sunny.")] * n

    monkeypatch.setattr("learner.responses.sample", fake_sample)
    return drawn


def test_output_constraint_keeps_what_shapes_the_answer_and_nothing_else():
    assert output_constraint({"response_format": SCHEMA, "temperature": 0.7}) == {
        "response_format": SCHEMA}
    assert output_constraint({"structured_outputs": {"json": {"type": "object"}}}) == {
        "structured_outputs": {"json": {"type": "object"}}}
    assert output_constraint({"response_format": {"type": "json_object"}}) == {
        "response_format": {"type": "json_object"}}
    assert output_constraint({"response_format": {"type": "text"}}) is None
    assert output_constraint({"response_format": "json"}) is None  # not the engine's shape
    assert output_constraint(None) is None and output_constraint({}) is None


SAMPLING = {"n": 2, "temperature": 0.7, "max_new_tokens": 32, "seed": 0}

def test_a_constrained_answer_is_redrawn_by_the_engine_under_its_constraint(trainer_samples):
    engine = Engine(['{"city_id": "city:paris"}'] * 3)
    got = draw(None, Tokenizer(), [{"role": "user", "content": "q"}], **SAMPLING, engine=engine,
               constraint={"response_format": SCHEMA})
    assert [Tokenizer().decode(g) for g in got] == ['{"city_id": "city:paris"}'] * 2
    assert engine.asked == [{"response_format": SCHEMA}] and not trainer_samples


def test_an_unconstrained_answer_stays_with_the_trainers_model(trainer_samples):
    engine = Engine(["{}"])
    draw(None, Tokenizer(), [{"role": "user", "content": "q"}], **SAMPLING, engine=engine, constraint=None)
    assert not engine.asked and trainer_samples == [2]


def test_an_engine_that_refuses_leaves_the_round_with_the_trainers_samples(trainer_samples):
    engine = Engine([], fail=OSError("HTTP Error 400: Bad Request"))
    got = draw(None, Tokenizer(), [{"role": "user", "content": "q"}], **SAMPLING, engine=engine,
               constraint={"response_format": SCHEMA})
    assert len(got) == 2 and trainer_samples == [2]


def test_an_env_error_keeps_a_fix_the_teacher_repeats_and_never_the_failed_answer(
        trainer_samples):
    failed = '{"city_id": "Paris"}'
    error = '{"error": "unknown city_id \'Paris\': ids look like \'city:rio-de-janeiro\'"}'

    def kept(answers: list[str]) -> list[str]:
        engine = Engine(answers)
        return [Tokenizer().decode(k) for k in teacher_regenerations(
            None, Tokenizer(), [{"role": "user", "content": "Weather in Paris?"}],
            [{"role": "user", "content": "Weather in Paris? " + error}], error, n=len(answers),
            temperature=0.7, max_new_tokens=32, seed=0, engine=engine,
            constraint={"response_format": SCHEMA}, failed=failed)]

    assert kept(['{ "city_id":"Paris" }', '{"city_id": "city:paris"}',
                 '{"city_id":"city:paris"}', '{"city_id": "paris"}']) == [
        '{"city_id": "city:paris"}', '{"city_id":"city:paris"}']  # the same value, twice
    assert kept(['{"city_id": "Paris"}', '{"city_id": "Paris"}', '{"city_id": "x-1"}',
                 '{"city_id": "Barcelona-12345"}']) == []  # the failure repeated; guesses once


def test_a_demonstrated_call_keeps_the_teacher_answers_that_make_it_exactly(trainer_samples):
    # The words filter would keep every one of these: the key "city_id" is the word the
    # demonstration adds to the question.
    answers = ['{"city_id": "Paris"}', '{"city_id":"city:paris"}', '{"city_id": "city:lyon"}',
               '{ "city_id": "city:paris" }']
    kept = teacher_regenerations(
        None, Tokenizer(), [{"role": "user", "content": "Weather in Paris?"}],
        [{"role": "user", "content": 'Weather in Paris? e.g. {"city_id": "city:paris"}'}],
        '{"city_id": "city:paris"}', n=4, temperature=0.7, max_new_tokens=32, seed=0,
        engine=Engine(answers), constraint={"response_format": SCHEMA}, call=True)
    assert [Tokenizer().decode(k) for k in kept] == [answers[1], answers[3]]


def test_same_answer_compares_json_by_value_and_text_up_to_case_and_spacing():
    assert same_answer('{"a": 1, "b": "x"}', '{"b":"x","a":1}')
    assert not same_answer('{"a": "X"}', '{"a": "x"}')
    assert same_answer("The  Answer", "the answer")
    assert not same_answer("Paris", "city:paris")
