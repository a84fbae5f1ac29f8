"""Distillation losses against brute-force references on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import (
    Divergence,
    Support,
    TokenLossConfig,
    chunked_token_losses,
    reduce_token_losses,
    token_losses_from_logits,
    token_losses_from_teacher_topk,
    with_tail,
)

torch.manual_seed(0)
N, V, H = 6, 7, 5


def probs(logits: torch.Tensor) -> list[list[float]]:
    return torch.softmax(logits.double(), -1).tolist()


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def brute(t: list[float], s: list[float], div: Divergence) -> float:
    if div.name == "forward_kl":
        return kl(t, s)
    if div.name == "reverse_kl":
        return kl(s, t)
    m = [div.alpha * a + (1 - div.alpha) * b for a, b in zip(t, s, strict=True)]
    return div.alpha * kl(t, m) + (1 - div.alpha) * kl(s, m)


def brute_topk(t: list[float], s: list[float], k: int) -> tuple[list[float], list[float]]:
    top = sorted(range(len(t)), key=lambda i: -t[i])[:k]
    tt = [t[i] for i in top]
    ss = [s[i] for i in top]
    return [*tt, 1 - sum(tt)], [*ss, 1 - sum(ss)]


DIVS = [Divergence("forward_kl"), Divergence("reverse_kl"), Divergence("jsd", 0.5),
        Divergence("jsd", 0.1)]


@pytest.mark.parametrize("div", DIVS, ids=str)
def test_full_vocab_matches_brute_force(div):
    s, t = torch.randn(N, V), torch.randn(N, V)
    got = token_losses_from_logits(s, t, torch.zeros(N, dtype=torch.long),
                                   TokenLossConfig(divergence=div))
    want = [brute(tp, sp, div) for tp, sp in zip(probs(t), probs(s), strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("div", DIVS, ids=str)
def test_topk_with_tail_matches_brute_force(div):
    s, t = torch.randn(N, V), torch.randn(N, V)
    cfg = TokenLossConfig(divergence=div, support=Support("topk", 3))
    got = token_losses_from_logits(s, t, torch.zeros(N, dtype=torch.long), cfg)
    want = [brute(*brute_topk(tp, sp, 3), div) for tp, sp in zip(probs(t), probs(s), strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_topk_plus_tail_is_a_distribution():
    logp = torch.log_softmax(torch.randn(N, V) * 4, -1)
    for k in (1, 3, V - 1):
        top = logp.topk(k, -1).values
        assert with_tail(top).exp().sum(-1).tolist() == pytest.approx([1.0] * N, abs=1e-5)


def test_engine_topk_teacher_equals_topk_from_full_teacher_logits():
    s, t = torch.randn(N, V), torch.randn(N, V)
    cfg = TokenLossConfig(divergence=Divergence("forward_kl"), support=Support("topk", 4))
    t_logp = torch.log_softmax(t, -1)
    top = t_logp.topk(4, -1)
    from_engine = token_losses_from_teacher_topk(s, top.indices, top.values, cfg)
    from_logits = token_losses_from_logits(s, t, torch.zeros(N, dtype=torch.long), cfg)
    assert torch.allclose(from_engine, from_logits, atol=1e-6)


def test_sampled_token_gradient_is_reverse_kl_gradient_in_expectation():
    s = torch.randn(1, V, dtype=torch.double, requires_grad=True)
    t = torch.randn(1, V, dtype=torch.double)
    cfg = TokenLossConfig(support=Support("sampled_token"))
    s_p = torch.softmax(s, -1)[0].detach()
    expected = torch.zeros(V, dtype=torch.double)  # exact expectation over y ~ S
    for y in range(V):
        (g,) = torch.autograd.grad(token_losses_from_logits(s, t, torch.tensor([y]), cfg).sum(), s)
        expected += s_p[y] * g[0]
    exact = torch.autograd.grad(token_losses_from_logits(
        s, t, torch.zeros(1, dtype=torch.long), TokenLossConfig(divergence=Divergence("reverse_kl"))
    ).sum(), s)[0][0]
    assert torch.allclose(expected, exact, atol=1e-10)


@pytest.mark.parametrize("support", [Support("full_vocab"), Support("topk", 3),
                                     Support("sampled_token")], ids=str)
@pytest.mark.parametrize("div", DIVS[:3], ids=str)
def test_a_gradient_step_moves_the_student_toward_the_teacher(div, support):
    s = torch.randn(N, V, requires_grad=True)
    t = (torch.randn(N, V) * 2).requires_grad_()  # as a teacher's logits would, without the guard
    targets = torch.distributions.Categorical(logits=s.detach()).sample()
    cfg = TokenLossConfig(divergence=div, support=support)
    loss = token_losses_from_logits(s, t, targets, cfg).mean()
    loss.backward()
    before = token_losses_from_logits(s, t, targets, TokenLossConfig(divergence=div)).mean()
    with torch.no_grad():
        stepped = s - 0.05 * s.grad
    after = token_losses_from_logits(stepped, t, targets, TokenLossConfig(divergence=div)).mean()
    if support.name == "sampled_token":  # one sample per position: direction holds on average
        before = token_losses_from_logits(s, t, targets, TokenLossConfig(
            divergence=Divergence("reverse_kl"))).mean()
        after = token_losses_from_logits(stepped, t, targets, TokenLossConfig(
            divergence=Divergence("reverse_kl"))).mean()
        assert after < before + 1e-3
    else:
        assert after < before
    assert t.grad is None  # nothing flows into the teacher (the loss detaches it)


@pytest.mark.parametrize("support", [Support("full_vocab"), Support("topk", 3),
                                     Support("sampled_token")], ids=str)
def test_chunked_equals_unchunked_in_value_and_gradient(support):
    head = torch.nn.Linear(H, V, bias=False)
    s_h = torch.randn(N * 3, H, requires_grad=True)
    t_h = torch.randn(N * 3, H)
    targets = torch.randint(0, V, (N * 3,))
    whole = TokenLossConfig(divergence=Divergence("jsd", 0.3), support=support, chunk_size=10**6)
    parts = TokenLossConfig(divergence=Divergence("jsd", 0.3), support=support, chunk_size=4)
    a, _ = chunked_token_losses(s_h, t_h, head, targets, whole)
    (ga_h, ga_w) = torch.autograd.grad(a.sum(), [s_h, head.weight])
    b, _ = chunked_token_losses(s_h, t_h, head, targets, parts)
    (gb_h, gb_w) = torch.autograd.grad(b.sum(), [s_h, head.weight])
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(ga_h, gb_h, atol=1e-6) and torch.allclose(ga_w, gb_w, atol=1e-6)


def test_reduce_skips_first_tokens_and_caps_importance_weights():
    per_token = torch.tensor([1.0, 2.0, 3.0, 10.0])
    mask = torch.tensor([1, 1, 1, 0])
    pos = torch.tensor([0, 1, 2, 3])
    plain = reduce_token_losses(per_token, mask, TokenLossConfig())
    assert plain.item() == pytest.approx(2.0)
    skipped = reduce_token_losses(per_token, mask, TokenLossConfig(skip_first_tokens=1),
                                  position_in_response=pos)
    assert skipped.item() == pytest.approx(5.0 / 3)
    weighted = reduce_token_losses(
        per_token, mask, TokenLossConfig(is_cap=2.0),
        student_logp_y=torch.log(torch.tensor([0.5, 0.9, 0.1, 0.5])),
        engine_logp_y=torch.log(torch.tensor([0.5, 0.3, 0.2, 0.5])))
    assert weighted.item() == pytest.approx((1 * 1 + 2 * 2 + 3 * 0.5) / 3)  # 3x capped at 2


def test_point_wise_clip_caps_each_vocabulary_term():
    s, t = torch.randn(N, V), torch.randn(N, V) * 3
    clip = 0.05
    got = token_losses_from_logits(s, t, torch.zeros(N, dtype=torch.long),
                                   TokenLossConfig(token_clip=clip))
    want = [sum(min(tp[v] * (math.log(tp[v]) - math.log(sp[v])), clip) for v in range(V))
            for tp, sp in zip(probs(t), probs(s), strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(("text", "want"), [
    ("forward_kl", Divergence("forward_kl")), ("jsd(0.5)", Divergence("jsd", 0.5)),
    ("jsd", Divergence("jsd", 0.5)), ("reverse_kl", Divergence("reverse_kl")),
])
def test_divergence_names_parse(text, want):
    assert Divergence.parse(text) == want and Divergence.parse(str(want)) == want


@pytest.mark.parametrize("text", ["kl", "jsd(1.5)", "jsd(0)", "topk(3)"])
def test_bad_divergence_names_say_what_is_allowed(text):
    with pytest.raises(ValueError, match="divergence|alpha"):
        Divergence.parse(text)


def test_support_names_parse():
    assert Support.parse("topk(100)") == Support("topk", 100)
    assert Support.parse("full_vocab") == Support("full_vocab")
    with pytest.raises(ValueError, match="topk"):
        Support.parse("topk(0)")
