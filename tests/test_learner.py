"""The learner step on the tiny model without DeepSpeed (`PlainEngine`): importance correction of stale
thoughts against a hand computation from the model's own score outputs, on-policy steps untouched; and the
progress line a person reads from the step's metrics."""

import json
import math

import pytest
import torch
from conftest import padded_batch, randomise_thinking_parts

from qstar_rl.checkpoint import RunState
from qstar_rl.config import Config, LossConfig, OptimConfig, ThoughtConfig, TrainConfig, WandbConfig
from qstar_rl.core.losses import quiet_star_loss
from qstar_rl.data import DataStats
from qstar_rl.engine import PlainEngine
from qstar_rl.learner import learn_step, train_step
from qstar_rl.loading import tiny_lm
from qstar_rl.metrics import MetricsLogger, log_step
from qstar_rl.model import NonFiniteModel, ScoreOutput, ThinkingLM, enable_activation_checkpointing
from qstar_rl.rollout import ThoughtBatch, rollout

NUM_THOUGHTS, LENGTH = 2, 3  # R, M


def tiny_config(micro_batches: int = 1) -> Config:
    return Config(
        thought=ThoughtConfig(num_thoughts=NUM_THOUGHTS, length=LENGTH, talk_length=2, init_token_id=5),
        loss=LossConfig(policy_weight=1.0, is_cap=2.0),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        train=TrainConfig(micro_batch_size=2, global_batch_size=2 * micro_batches),
    )


def tiny_model(config: Config) -> ThinkingLM:
    model = ThinkingLM(tiny_lm("llama"), config.thought)
    randomise_thinking_parts(model)  # a non-zero mixing head: thoughts get different rewards
    return model


def sample(model: ThinkingLM, seed: int, version: int) -> ThoughtBatch:
    ids, mask = padded_batch(seq_len=16, lengths=(16, 11), seed=seed)
    batch = {"input_ids": ids, "attention_mask": mask, "window_ids": torch.tensor([2 * seed, 2 * seed + 1])}
    return rollout(model, batch, seed=0, policy_version=version)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def policy_by_hand(out: ScoreOutput, weights: torch.Tensor, num_valid: int) -> float:
    """sum over valid positions, thoughts and tokens of -w * A * log pi(tau_reinforce) / (N * R * M), with the
    advantage written out: reward = sum_k talk log-probs, minus the mean over thoughts, clamped at 0."""
    reward = out.talk_logprobs.detach().double().sum(dim=-1)  # (B, R, T)
    adv = (reward - reward.mean(dim=1, keepdim=True)).clamp(min=0) * out.valid[:, None, :]
    terms = weights.double() * adv.unsqueeze(-1) * out.policy_logprobs.detach().double()  # (B, R, T, M)
    return -terms.sum().item() / (num_valid * NUM_THOUGHTS * LENGTH)


def test_on_policy_thoughts_get_weight_one_and_exactly_the_plain_loss():
    config = tiny_config()
    model = tiny_model(config)
    thoughts = sample(model, seed=0, version=3)
    # Rollout log-probs far from the learner's: were any ratio computed for on-policy thoughts, it would show.
    thoughts.thought_logprobs = thoughts.thought_logprobs + 1.0
    out = model(thoughts.input_ids, thoughts.thought_ids, thoughts.attention_mask)  # before the update
    num_valid = torch.tensor(float(out.valid.sum()), dtype=torch.float64)  # as learn_step counts it
    plain = quiet_star_loss(
        out.base_logprobs, out.talk_logprobs, out.policy_logprobs, out.valid, policy_weight=1.0, num_valid=num_valid
    )
    result = learn_step(PlainEngine(model, config), [thoughts], config, 3, identity, 1)
    m = result.metrics
    assert m["policy/staleness"] == 0
    assert m["thought/logprob_gap"] == pytest.approx(1.0, abs=1e-4)  # the perturbation reached the learner
    assert m["policy/is_weight_mean"] == 1.0 and m["policy/is_clipped_frac"] == 0.0
    assert m["loss/policy"] != 0.0, "the tiny model must give some thought a positive advantage"
    assert m["loss/policy"] == plain.policy.item()
    assert m["loss/total"] == plain.total.item()
    assert not result.skipped


def test_stale_thoughts_are_weighted_by_the_truncated_ratio():
    config = tiny_config(micro_batches=2)
    model = tiny_model(config)
    stale, fresh = sample(model, seed=0, version=4), sample(model, seed=1, version=5)
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(stale.thought_logprobs.shape, generator=gen) * 3 - 1.5  # (B, R, T, M) in (-1.5, 1.5)
    stale.thought_logprobs = stale.thought_logprobs + noise  # ratios exp(-noise) in (0.22, 4.5); cap 2
    with torch.no_grad():
        outs = [model(t.input_ids, t.thought_ids, t.attention_mask) for t in (stale, fresh)]
    learner_lp = outs[0].thought_logprobs
    weights = torch.minimum((learner_lp - stale.thought_logprobs).exp(), torch.tensor(2.0))  # (B, R, T, M)
    ones = torch.ones_like(outs[1].thought_logprobs)  # the fresh micro-batch stays plain REINFORCE
    num_valid = int(outs[0].valid.sum() + outs[1].valid.sum())
    policy = policy_by_hand(outs[0], weights, num_valid) + policy_by_hand(outs[1], ones, num_valid)
    unweighted = policy_by_hand(outs[0], ones, num_valid) + policy_by_hand(outs[1], ones, num_valid)
    masks = [o.valid[:, None, :, None].expand_as(o.thought_logprobs) for o in outs]  # (B, R, T, M)
    tokens = sum(int(mask.sum()) for mask in masks)
    weight_mean = (weights[masks[0]].double().sum().item() + int(masks[1].sum())) / tokens
    clipped = ((learner_lp - stale.thought_logprobs).exp() > 2.0)[masks[0]].sum().item() / tokens

    result = learn_step(PlainEngine(model, config), [stale, fresh], config, 5, identity, 1)
    m = result.metrics
    assert m["policy/staleness"] == 1
    assert 0 < clipped < 0.5 and abs(weight_mean - 1) > 0.01, "the noise must move and clip some weights"
    assert m["policy/is_weight_mean"] == pytest.approx(weight_mean, rel=1e-5)
    assert m["policy/is_clipped_frac"] == pytest.approx(clipped, abs=1e-9)
    assert m["loss/policy"] == pytest.approx(policy, rel=1e-5)
    assert abs(policy - unweighted) > 1e-3 * abs(unweighted), "the weights must change the loss"
    assert math.isfinite(m["loss/total"]) and not result.skipped


def test_progress_line_names_the_terms_and_not_the_weighted_loss(tmp_path, capsys):
    config = Config(train=TrainConfig(steps=20), wandb=WandbConfig(mode="disabled"))
    logger = MetricsLogger(config, tmp_path, rank=0)
    metrics = {
        "loss/total": 1649.25,
        "loss/policy": 0.00164925,
        "reward/mean": -4.12345,
        "reward/var_within_position": 1.2345e-5,
        "advantage/frac_positive": 0.5,
        "loss/nll_base": 2.34567,
        "loss/nll_talk": 2.41234,
        "mixing/weight_mean": 0.00123456,
        "perf/tokens_per_s": 812.34,
    }
    logger.log_step(7, metrics)
    logger.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    for field in [
        "step 7/20",
        "reward -4.12",
        "var 1.23e-05",
        "adv>0 50%",
        "nll base 2.35",
        "talk 2.41",
        "mix w 0.00123",
        "812 tok/s",
        "eta ",
    ]:
        assert field in line, (field, line)
    assert "loss" not in line and "1649" not in line, line
    assert '"loss/total": 1649.25' in (tmp_path / "metrics.jsonl").read_text(), "the file keeps every metric"


def test_the_learner_scores_in_train_mode_in_every_placement():
    """HF models load in eval mode and rollout/evaluation switch to it; learn_step must set train mode itself
    (activation checkpointing only runs in train mode), whether this process sampled (colocated) or not
    (Ray learner actors, which only ever call learn_step)."""
    config = tiny_config()
    model = tiny_model(config)
    enable_activation_checkpointing(model.lm)
    engine = PlainEngine(model, config)
    modes: list[bool] = []
    model.lm.base_model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    ids, mask = padded_batch(seq_len=16, lengths=(16, 11), seed=0)
    batch = {"input_ids": ids, "attention_mask": mask, "window_ids": torch.tensor([0, 1])}

    model.eval()  # as from_pretrained leaves it: a disaggregated learner never samples
    thoughts = rollout(model, batch, seed=0, policy_version=0)
    modes.clear()
    learn_step(engine, [thoughts], config, 0, identity, 1)
    assert modes == [True, True]  # the text pass and the branch pass of `score`

    modes.clear()  # colocated: sampling (eval mode) then learning (train mode) in one step
    train_step(engine, model, [batch], config, 1, identity, 1)
    assert modes == [False] * (1 + LENGTH) + [True, True]  # text + M decode steps, then score


def test_the_nll_objective_samples_no_thought_and_steps_on_the_base_nll_alone():
    """loss.objective 'nll' (the experiment's control): no thought sampled, the loss is the mean NLL of the base
    model over the method's valid positions, and the update equals a hand-made AdamW step on that NLL."""
    import copy
    import dataclasses

    config = tiny_config()
    config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, objective="nll"))
    model = tiny_model(config)
    reference = copy.deepcopy(model)
    ids, mask = padded_batch(seq_len=16, lengths=(16, 11), seed=0)
    batch = {"input_ids": ids, "attention_mask": mask, "window_ids": torch.tensor([0, 1])}
    result = train_step(PlainEngine(model, config), model, [batch], config, 0, identity, 1)
    assert result.metrics["tokens/thought"] == 0 and result.samples == []
    assert "reward/mean" not in result.metrics and result.metrics["loss/policy"] == 0

    # by hand: -mean over valid positions i of log p(x_{i+1}), valid = x_{i+1..i+K} real (K = 2)
    reference.train()
    logits = reference.lm(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    valid = torch.zeros_like(mask, dtype=torch.bool)
    valid[:, :-2] = mask[:, 1:-1].bool() & mask[:, 2:].bool()
    nll = -(logprobs * valid[:, :-1]).sum() / valid.sum()
    assert result.metrics["loss/nll_base"] == pytest.approx(nll.item(), rel=1e-5)
    optimizer = PlainEngine(reference, config).optimizer
    nll.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), config.optim.grad_clip)
    optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


def test_a_non_finite_gradient_skips_the_update_and_is_counted(tmp_path):
    """A gradient with an infinity in it (as an overflowing step would give): the weights and the optimizer state
    stay exactly as they were, StepResult.skipped is set and the logged optim/skipped_steps counts it; the next
    finite step updates again."""
    config = tiny_config()
    model = tiny_model(config)
    engine = PlainEngine(model, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    weight = model.mixing_head.net[0].weight
    hook = weight.register_hook(lambda grad: grad * float("inf"))
    result = learn_step(engine, [sample(model, seed=0, version=0)], config, 0, identity, 1)
    hook.remove()
    assert result.skipped and not math.isfinite(result.metrics["optim/grad_norm"])
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert engine.optimizer.state == {}  # AdamW never ran: no moments to carry the infinity forward
    config.wandb = WandbConfig(mode="disabled")
    state = RunState(step=1)
    logger = MetricsLogger(config, tmp_path, rank=0)
    log_step(logger, config, None, state, result, DataStats())
    logger.close()
    assert state.skipped_steps == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["optim/skipped_steps"] == 1
    result = learn_step(engine, [sample(model, seed=1, version=0)], config, 0, identity, 1)
    assert not result.skipped and not torch.equal(weight, before["mixing_head.net.0.weight"])


def test_a_model_that_is_no_longer_finite_stops_thought_sampling_with_a_clear_error():
    """Weights that are not finite (loaded so, or overflowed in the forward) stop thought sampling with
    NonFiniteModel (the trainer's exit 1 and message) instead of a traceback from torch.multinomial."""
    model = tiny_model(tiny_config())
    with torch.no_grad():
        model.lm.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(NonFiniteModel, match="thought sampling met non-finite probabilities"):
        sample(model, seed=1, version=1)
