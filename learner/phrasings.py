"""Other phrasings of a corrected question, asked by the model itself.

Knowledge learned from one phrasing of a question is rarely recalled from another (Physics of
Language Models 3.1: ~10 % extraction from a single form, ~96 % from varied ones), and a user
asks a corrected fact again in their own words. So before a round learns from a correction, the
model it improves is asked to put the question in other words, by a few-shot pattern in plain
text (asked in the chat template, the embedded model answers the question instead of rewording
it). Each phrasing it gives becomes a prompt of its own, which the teacher answers with the same
feedback in context: more training pairs, and more keys for the closed-form edit.

A sampled rewrite is kept only when it is still the same question: a question (it ends in '?'),
different from the original and from the other kept ones, keeping the words the question shares
with the feedback (its subject: "capital" and "Veloria" in "What is the capital of Veloria?"
corrected by "The capital of Veloria is Marenthal"; every name among them, all but one of the
others), and not giving away any word the feedback adds (the answer): a phrasing that holds the
answer teaches the student to find it in the question. Nothing here knows any evaluation set;
the rule is the question, the feedback and the sample.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from learner.inference import pad_id
from learner.responses import added_words, content_words

# General-knowledge examples of the pattern, about nothing a round could be taught.
PATTERN = """Each question is asked again in other words, with the same meaning.

Question: How tall is the Eiffel Tower?
In other words: What is the height of the Eiffel Tower?

Question: Who painted the Mona Lisa?
In other words: Which artist created the painting Mona Lisa?

Question: What does a barometer measure?
In other words: A barometer is used to measure what?

Question: When did the Berlin Wall fall?
In other words: In what year did the Berlin Wall come down?

Question: {question}
In other words:"""
_MAX_WORDS_FACTOR = 2.5


def subject_words(question: str, signal: str) -> set[str]:
    """The content words of the question the feedback repeats: what the question is about."""
    return content_words(question) & content_words(signal)


def is_rephrasing(candidate: str, question: str, signal: str) -> bool:
    """Whether `candidate` asks `question` again in other words, without its answer."""
    text = candidate.strip()
    if "\n" in text or not text.endswith("?"):
        return False
    if _norm(text) == _norm(question):
        return False
    words = content_words(text)
    if words & added_words(question, signal):
        return False
    if len(text.split()) > _MAX_WORDS_FACTOR * len(question.split()) + 4:
        return False
    subject = subject_words(question, signal) or content_words(question)
    names = subject & _names(question)
    missing = subject - words
    # Every name kept, and every other subject word but one when there are two or more:
    # "invented" may become "created", "Veloria" may not become "Norway".
    return not missing & names and len(missing) <= (1 if len(subject) >= 2 else 0)


def _names(question: str) -> set[str]:
    """Capitalised words past the first: the names a question holds."""
    words = question.split()[1:]
    return {w.lower() for w in content_words(" ".join(x for x in words if x[:1].isupper()))}


def rephrasings(model: Any, tokenizer: Any, question: str, signal: str, n: int, *,
                seed: int = 0, samples: int = 12, temperature: float = 0.8,
                max_new_tokens: int = 40) -> list[str]:
    """Up to `n` distinct rephrasings of `question` by `model` (the version a round improves),
    each passing `is_rephrasing`; fewer (or none) when the model gives fewer."""
    if n <= 0:
        return []
    prompt = tokenizer(PATTERN.format(question=question.strip()), return_tensors="pt").input_ids
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(prompt.to(next(model.parameters()).device), do_sample=True,
                             temperature=temperature, top_p=None, top_k=None,
                             max_new_tokens=max_new_tokens, num_return_sequences=samples,
                             pad_token_id=pad_id(tokenizer))
    kept: list[str] = []
    for row in out[:, prompt.shape[1]:].tolist():
        text = tokenizer.decode(row, skip_special_tokens=True).split("\n", 1)[0].strip()
        if is_rephrasing(text, question, signal) and _norm(text) not in {_norm(k) for k in kept}:
            kept.append(text)
        if len(kept) == n:
            break
    return kept


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))
