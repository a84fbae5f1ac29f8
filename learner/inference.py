"""Running the trainer's model: chat-templated prompts, generation, and teacher-forced scoring.

The learner's round (teacher regenerations, held-out answers, anchors), its gate (retention,
drift) and the version's probe all ask the same few things of the model in transformers; they
are here once. The serving engine is never asked from here (see `learner.responses.EnginePolicy`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import DynamicCache


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


@torch.no_grad()
def response_log_probs(model: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Next-token log-distributions [len(response), V] at the positions that predict the
    response, teacher-forced."""
    ids = torch.tensor([prompt + response], device=next(model.parameters()).device)
    start = len(prompt) - 1
    return torch.log_softmax(model(input_ids=ids).logits[0, start:start + len(response)].float(), -1)


@torch.no_grad()
def adapter_and_base_log_probs(model: Any, prompt: list[int],
                               response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_log_probs` with the adapter and without it: what the probe and the gate's
    drift compare."""
    tuned = response_log_probs(model, prompt, response)
    with model.disable_adapter():
        return tuned, response_log_probs(model, prompt, response)


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, or end-of-text where it has none."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


@torch.no_grad()
def generate_greedy(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]],
                    max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy answers (token ids, ending at end-of-turn) to many conversations, batched."""
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    for start in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tokenizer, c) for c in conversations[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
        for row in out[:, width:].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


@torch.no_grad()
def sample(model: Any, tokenizer: Any, messages: list[dict[str, Any]], n: int,
           temperature: float, max_new_tokens: int, seed: int = 0) -> list[list[int]]:
    """`n` sampled responses (token ids, end-of-turn kept, padding dropped) to `messages`."""
    prompt = prompt_ids(tokenizer, messages)
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    torch.manual_seed(seed)
    out = model.generate(
        ids, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_p=None, top_k=None, max_new_tokens=max_new_tokens, num_return_sequences=n,
        pad_token_id=pad_id(tokenizer),
    )
    eos = tokenizer.eos_token_id
    responses = []
    for row in out[:, len(prompt):].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        responses.append(row)
    return responses


@torch.no_grad()
def answer_log_probs(model: Any, tokenizer: Any, prompts: list[list[int]], answers: list[list[int]],
                     batch_size: int = 16) -> list[tuple[list[float], list[int]]]:
    """Per answer: the log-probability of each of its tokens after its prompt, and the model's
    greedy choice at each of those positions — teacher-forced, one forward pass per batch.

    The prompts' shared opening runs once a batch (`answer_hidden`), and the vocabulary
    projection runs on the answer positions only — on the gate's few hundred short questions
    that is most of the work."""
    if not prompts:
        return []
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    lm_head = model.get_output_embeddings()
    # Batches of alike lengths pad least; results come back in the callers' order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(answers[i]))
    out: list[tuple[list[float], list[int]]] = [([], [])] * len(prompts)
    for start in range(0, len(order), batch_size):
        picked = order[start:start + batch_size]
        for i, hidden in zip(picked, answer_hidden(model, [prompts[i] for i in picked],
                                                    [answers[i] for i in picked], pad),
                             strict=True):
            logp = torch.log_softmax(lm_head(hidden).float(), -1)
            target = torch.tensor(answers[i], device=device)[:, None]
            out[i] = (logp.gather(-1, target)[:, 0].tolist(), logp.argmax(-1).tolist())
    return out


def answer_hidden(model: Any, prompts: list[list[int]], answers: list[list[int]],
                  pad: int) -> list[torch.Tensor]:
    """The final hidden states at the positions that predict each answer token ([len(answer),
    H] per answer), every prompt + answer in one forward pass — with gradient when the caller
    has it on.

    Chat-templated prompts share their opening (the system turn, the user header): it runs
    once for the batch and its keys and values are reused by every row. Rows are padded on the
    right: causal attention never lets a real token see the padding after it, and positions
    stay those of an unpadded pass."""
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    # Every prompt keeps at least its last token, whose position predicts the first answer token;
    # a single row has nothing to share.
    shared = (os.path.commonprefix(prompts)[: min(len(p) for p in prompts) - 1]
              if len(prompts) > 1 else [])
    past = None
    if shared:
        cache = decoder(input_ids=torch.tensor([shared], device=device), use_cache=True).past_key_values
        past = DynamicCache(ddp_cache_data=[(layer.keys.expand(len(prompts), -1, -1, -1),
                                             layer.values.expand(len(prompts), -1, -1, -1))
                                            for layer in cache.layers])
    rows = [p[len(shared):] + a for p, a in zip(prompts, answers, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * (len(shared) + len(r)) + [0] * (width - len(r)) for r in rows],
                        device=device)
    hidden = decoder(input_ids=ids, attention_mask=mask, past_key_values=past,
                     use_cache=past is not None).last_hidden_state
    return [hidden[row, len(p) - 1 - len(shared):len(p) - 1 - len(shared) + len(a)]
            for row, (p, a) in enumerate(zip(prompts, answers, strict=True))]
