"""ThinkingLM against the plain per-branch reference (docs/design.md section 1) on four model families."""

import copy

import pytest
import torch
from conftest import make_model, padded_batch
from reference import (
    reference_base_logprobs,
    reference_branch,
    reference_greedy_thought,
)

import qstar_rl.model as model_module
from qstar_rl.core.losses import quiet_star_loss
from qstar_rl.loading import tiny_lm

ATOL = 1e-4


def test_score_matches_plain_reference(family):
    torch.manual_seed(0)
    model = make_model(family, num_thoughts=3, length=3, talk_length=2)
    ids, mask = padded_batch(seq_len=37, lengths=(37, 29))
    thought_ids, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.score(ids, thought_ids, mask)
        assert out.thought_logprobs.shape == (2, 3, 37, 3)
        assert out.talk_logprobs.shape == out.mixing_weight.shape == (2, 3, 37, 2)
        assert out.mixing_weight.abs().max() > 1e-3, "the randomised mixing head must be exercised"
        checked = 0
        for b, num_real in enumerate((37, 29)):
            ref_base = reference_base_logprobs(model, ids, b, num_real)
            torch.testing.assert_close(out.base_logprobs[b, : num_real - 1], ref_base, atol=ATOL, rtol=0)
            for i in range(num_real):
                for r in range(3):
                    thought_lp, talk_lp, weight = reference_branch(model, ids, thought_ids, b, r, i)
                    torch.testing.assert_close(out.thought_logprobs[b, r, i], thought_lp, atol=ATOL, rtol=0)
                    if out.valid[b, i]:
                        torch.testing.assert_close(out.talk_logprobs[b, r, i], talk_lp, atol=ATOL, rtol=0)
                        torch.testing.assert_close(out.mixing_weight[b, r, i], weight, atol=ATOL, rtol=0)
                        checked += 1
        # valid = all K=2 targets inside the window and real: 37-2 and 29-2 positions
        assert out.valid.sum().item() == (37 - 2) + (29 - 2)
        assert checked == 3 * out.valid.sum().item()


def test_sampled_logprobs_equal_scored_logprobs(family):
    model = make_model(family, num_thoughts=2, length=4, talk_length=3)
    ids, mask = padded_batch(seq_len=23, lengths=(23, 17), seed=3)
    thought_ids, sampled_lp = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scored = model.score(ids, thought_ids, mask).thought_logprobs
    real = mask.bool()[:, None, :].expand(-1, 2, -1)
    torch.testing.assert_close(sampled_lp[real], scored[real], atol=ATOL, rtol=0)


def test_greedy_sampling_equals_plain_greedy_generation(family):
    model = make_model(family, num_thoughts=2, length=4, talk_length=2)
    ids, mask = padded_batch(seq_len=19, lengths=(19, 13), seed=4)
    thought_ids, _ = model.sample_thoughts(ids, mask, greedy=True)
    assert torch.equal(thought_ids[:, 0], thought_ids[:, 1]), "greedy thoughts of one position are identical"
    with torch.no_grad():
        for b, i in [(0, 0), (0, 9), (0, 18), (1, 5), (1, 12)]:
            assert thought_ids[b, 0, i].tolist() == reference_greedy_thought(model, ids, b, i).tolist()


def test_thought_tokens_are_drawn_with_their_probabilities_and_never_a_zero_probability_one():
    """model._sample (inverse CDF over float64 cumulative probabilities): 200,000 draws of a fixed distribution
    over 7 tokens with two zero-probability ones (first and in the middle) land within 5 standard errors of
    each probability, never on a zero, and a list of generators gives each sequence its own stream."""
    from qstar_rl.model import _sample

    probs = torch.tensor([0.0, 0.05, 0.3, 0.0, 0.15, 0.4, 0.1])
    draws = 200_000
    logits = probs.log().expand(1, draws, -1)  # (B, N, V): -inf for the zeros
    tokens = _sample(logits, 1.0, torch.Generator().manual_seed(0))  # (B, N)
    freq = torch.bincount(tokens.flatten(), minlength=7).double() / draws
    assert freq[0] == 0 and freq[3] == 0
    std_err = (probs.double() * (1 - probs.double()) / draws).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * std_err + 1e-12).all(), freq
    both = _sample(probs.log().expand(2, 64, -1), 1.0, [torch.Generator().manual_seed(s) for s in (3, 3)])
    assert torch.equal(both[0], both[1])  # same seed, same stream, whatever the other row
    alone = _sample(probs.log().expand(1, 64, -1), 1.0, [torch.Generator().manual_seed(3)])
    assert torch.equal(alone[0], both[0])


def test_sampling_is_seeded_and_temperature_matters():
    model = make_model("llama", num_thoughts=2, length=5, talk_length=2)
    ids, mask = padded_batch(seq_len=16, lengths=(16, 16))
    a, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(7))
    b, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(7))
    c, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    cold, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(7), temperature=1e-4)
    greedy, _ = model.sample_thoughts(ids, mask, greedy=True)
    assert torch.equal(cold, greedy)


def test_mixed_prediction_equals_base_at_initialisation(family):
    model = make_model(family, num_thoughts=2, length=3, talk_length=3, randomise=False)
    ids, mask = padded_batch(seq_len=21, lengths=(21, 15), seed=5)
    thought_ids, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.score(ids, thought_ids, mask)
    assert out.mixing_weight.abs().max().item() == 0.0
    for s in range(3):  # talk step s predicts x_{i+s+1}, exactly what the base model predicts at i+s
        expected = torch.zeros_like(out.base_logprobs)
        expected[:, : 21 - s] = out.base_logprobs[:, s:]
        valid = out.valid[:, None, :].expand(-1, 2, -1)
        torch.testing.assert_close(
            out.talk_logprobs[..., s][valid], expected[:, None, :].expand(-1, 2, -1)[valid], atol=1e-6, rtol=0
        )


def test_one_backward_reaches_every_trained_part(family):
    model = make_model(family, num_thoughts=2, length=3, talk_length=2)
    model.train()
    ids, mask = padded_batch(seq_len=17, lengths=(17, 12), seed=6)
    thought_ids, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    out = model.score(ids, thought_ids, mask)
    loss = quiet_star_loss(
        out.base_logprobs,
        out.talk_logprobs,
        out.policy_logprobs,
        out.valid,
        policy_weight=1.0,
        positive_advantage_only=False,
    )
    loss.total.backward()
    named = dict(model.named_parameters())
    groups = {
        "start_embedding": [named["start_embedding"]],
        "end_embedding": [named["end_embedding"]],
        "mixing_head": list(model.mixing_head.parameters()),
        "lm": [p for n, p in named.items() if n.startswith("lm.")],
    }
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        assert grads, f"{name} got no gradient"
        assert all(torch.isfinite(g).all() for g in grads), name
        assert sum(g.abs().sum().item() for g in grads) > 0, f"{name} got an all-zero gradient"
    # every LM weight matrix of every layer is trained (text K/V included)
    assert all(p.grad is not None for p in groups["lm"] if p.requires_grad)


def test_dense_and_efficient_paths_agree_and_efficient_is_default(family, monkeypatch):
    model = make_model(family, num_thoughts=3, length=2, talk_length=2)
    assert model.thought.attention == "efficient"
    ids, mask = padded_batch(seq_len=13, lengths=(13, 9), seed=8)
    calls = {"efficient": 0, "dense": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(model_module, "branch_attention", spy("efficient", model_module.branch_attention))
    monkeypatch.setattr(model_module, "branch_attention_dense", spy("dense", model_module.branch_attention_dense))
    thought_ids, lp_eff = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eff = model.score(ids, thought_ids, mask)
    assert calls == {"efficient": calls["efficient"], "dense": 0} and calls["efficient"] > 0
    model.thought.attention = "dense"
    _, lp_dense = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model.score(ids, thought_ids, mask)
    assert calls["dense"] > 0
    torch.testing.assert_close(lp_eff, lp_dense, atol=1e-5, rtol=0)
    for field in ("thought_logprobs", "talk_logprobs", "mixing_weight", "base_logprobs"):
        torch.testing.assert_close(getattr(eff, field), getattr(dense, field), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_thoughts,length,talk_length", [(2, 1, 1), (4, 2, 5), (2, 7, 1)])
def test_odd_shapes_match_reference(num_thoughts, length, talk_length):
    model = make_model("qwen2", num_thoughts=num_thoughts, length=length, talk_length=talk_length)
    ids, mask = padded_batch(seq_len=11, lengths=(11, 8), seed=9)
    thought_ids, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.score(ids, thought_ids, mask)
        for b, i, r in [(0, 0, 0), (0, 11 - talk_length - 1, num_thoughts - 1), (1, 2, 1)]:
            thought_lp, talk_lp, _ = reference_branch(model, ids, thought_ids, b, r, i)
            torch.testing.assert_close(out.thought_logprobs[b, r, i], thought_lp, atol=ATOL, rtol=0)
            if out.valid[b, i]:
                torch.testing.assert_close(out.talk_logprobs[b, r, i], talk_lp, atol=ATOL, rtol=0)


def test_meta_tokens_start_from_the_init_token_embedding():
    model = make_model("llama", randomise=False)
    emb = model.lm.get_input_embeddings().weight
    assert torch.equal(model.start_embedding.data, emb[5]) and torch.equal(model.end_embedding.data, emb[5])
    assert model.start_embedding.data_ptr() != model.end_embedding.data_ptr()


def test_chunked_checkpointed_logits_equal_unchunked(family):
    ids, mask = padded_batch(seq_len=15, lengths=(15, 10), seed=10)
    results = []
    for chunk_tokens in (0, 7):  # 0: one pass, V-wide logits kept; 7: one position per chunk, recomputed
        model = make_model(family, num_thoughts=2, length=3, talk_length=2, logits_chunk_tokens=chunk_tokens)
        thought_ids, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
        out = model.score(ids, thought_ids, mask)
        loss = quiet_star_loss(out.base_logprobs, out.talk_logprobs, out.policy_logprobs, out.valid, policy_weight=1.0)
        loss.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    for field in ("thought_logprobs", "policy_logprobs", "talk_logprobs", "mixing_weight", "base_logprobs"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_per_sequence_generators_make_thoughts_independent_of_the_batch():
    model = make_model("mistral", num_thoughts=2, length=4, talk_length=2)
    ids, mask = padded_batch(seq_len=14, lengths=(14, 14, 14), seed=11)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together, lp_together = model.sample_thoughts(ids, mask, generator=gens([5, 6, 7]))
    for b, seed in enumerate([5, 6, 7]):
        alone, lp_alone = model.sample_thoughts(ids[b : b + 1], mask[b : b + 1], generator=gens([seed]))
        assert torch.equal(alone[0], together[b])
        torch.testing.assert_close(lp_alone[0], lp_together[b], atol=1e-5, rtol=0)
    swapped, _ = model.sample_thoughts(ids[[1, 0, 2]], mask, generator=gens([6, 5, 7]))
    assert torch.equal(swapped[0], together[1]) and torch.equal(swapped[1], together[0])


def test_activation_checkpointing_gives_the_same_scores_and_gradients(family):
    """HF activation checkpointing re-runs each decoder layer in backward with the kwargs of its first call:
    the text pass must stay the text pass, and text keys/values must keep their gradient (non-reentrant)."""
    ids, mask = padded_batch(seq_len=17, lengths=(17, 12), seed=12)
    results = []
    for checkpointing in (False, True):
        model = make_model(family, num_thoughts=2, length=3, talk_length=2)
        if checkpointing:
            model_module.enable_activation_checkpointing(model.lm)
        thought_ids, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
        model.train()
        out = model.score(ids, thought_ids, mask)
        loss = quiet_star_loss(out.base_logprobs, out.talk_logprobs, out.policy_logprobs, out.valid, policy_weight=1.0)
        loss.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    layer = next(m for m in model.lm.modules() if getattr(m, "gradient_checkpointing", False))
    assert layer.training, "checkpointing is only active in train mode"
    for field in ("thought_logprobs", "policy_logprobs", "talk_logprobs", "mixing_weight", "base_logprobs"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=0, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    missing = [n for n, g in grads_a.items() if g.abs().max() == 0 and "mixing_head.net.4" not in n]
    assert not missing, f"parameters without gradient: {missing}"
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-7, rtol=1e-5, msg=name)


def test_dropout_is_off_after_wrapping():
    lm = tiny_lm("gpt2")
    for module in lm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    model = model_module.ThinkingLM(lm, model_module.ThoughtConfig(2, 2, 2, init_token_id=5))
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids, mask = padded_batch(seq_len=9, lengths=(9, 9), seed=2)
    thought_ids, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()
        learning = model.score(ids, thought_ids, mask).thought_logprobs
        model.eval()
        sampling = model.score(ids, thought_ids, mask).thought_logprobs
    assert torch.equal(learning, sampling), "train and eval mode score the same policy"


def test_mixing_head_starts_like_the_authors():
    lm = tiny_lm("llama")
    lm.config.initializer_range = 0.05
    head = model_module.ThinkingLM(lm, model_module.ThoughtConfig(2, 2, 2, init_token_id=5)).mixing_head
    first, second, last = head.net[0], head.net[2], head.net[4]
    for layer in (first, second):
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert layer.weight.std().item() == pytest.approx(0.05, rel=0.1)
        assert layer.weight.mean().abs().item() < 0.01
    assert torch.equal(last.weight, torch.zeros_like(last.weight)) and last.bias.item() == 0.0


def test_bf16_rewards_follow_the_fp32_rewards_at_small_mixing_weight():
    """Mixing happens in fp32: with bf16 weights and w = 1e-3 (early training) the reward differences between
    two thoughts of a position must still be the thoughts' doing, not bf16 rounding (in bf16 ~40% of them
    came out exactly 0 and correlated ~0.6 with fp32 here)."""
    lm = tiny_lm("llama", vocab_size=3001, hidden_size=72)
    model = model_module.ThinkingLM(lm, model_module.ThoughtConfig(2, 3, 3, init_token_id=5))
    with torch.no_grad():
        model.mixing_head.net[4].bias.fill_(1e-3)  # w = 1e-3 everywhere
    ids, mask = padded_batch(seq_len=40, lengths=(40, 31), vocab=3001, seed=0)
    thought_ids, _ = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    bf16 = model.to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # the same (bf16-rounded) weights, computed in fp32

    def reward_differences(m):
        with torch.no_grad():
            out = m.score(ids, thought_ids, mask)
        reward = out.talk_logprobs.sum(-1)  # (B, R, T)
        return (reward[:, 0] - reward[:, 1])[out.valid].double()

    low, high = reward_differences(bf16), reward_differences(fp32)
    assert (low == 0).float().mean() < 0.05
    assert torch.corrcoef(torch.stack([low, high]))[0, 1] >= 0.99
