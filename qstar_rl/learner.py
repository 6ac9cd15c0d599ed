"""The learner: one Quiet-STaR optimizer step. The only place that calls backward and step.

The engine is a DeepSpeed engine, or `engine.PlainEngine` without DeepSpeed; both offer
`engine(input_ids, thought_ids, attention_mask) -> ScoreOutput`, `backward(loss)`, `step()`,
`get_global_grad_norm()` and `get_lr()`. Distributed plumbing comes in as two arguments:
`all_reduce_sum` (identity on one process) and `world_size`.
"""

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from qstar_rl.config import Config
from qstar_rl.core.layout import valid_positions
from qstar_rl.core.losses import (
    QuietStarLoss,
    nll_only_loss,
    quiet_star_loss,
    statistic_sums,
    statistics_from_sums,
    truncated_importance_weights,
)
from qstar_rl.model import ScoreOutput, ThinkingLM
from qstar_rl.rollout import ThoughtBatch, rollout


@dataclass
class StepResult:
    """What one optimizer step produced."""

    metrics: dict[str, float]
    """The metric keys of docs/design.md section 2 (those the step knows)."""
    skipped: bool
    """True when the gradient was not finite and the weights were left untouched."""
    samples: list[dict] = field(default_factory=list)
    """A few sampled thoughts of this rank's first sequence: position, thought ids, reward."""


def train_step(
    engine,
    model: ThinkingLM,
    micro_batches: list[dict[str, torch.Tensor]],
    config: Config,
    policy_version: int,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    world_size: int,
    full_weights: Callable[[], AbstractContextManager] | None = None,
) -> StepResult:
    """The colocated step (the `deepspeed` launcher, or Ray with cluster.colocate): this rank samples the
    thoughts of its own micro-batches, then learns from them."""
    start = time.perf_counter()
    gather_seconds = 0.0
    thoughts: list[ThoughtBatch] = []
    for batch in micro_batches:
        gather = _Timed(full_weights() if full_weights else None)
        think = config.loss.objective == "quiet_star"
        thoughts.append(rollout(model, batch, config.train.seed, policy_version, gather, think=think))
        gather_seconds += gather.seconds
    rollout_seconds = time.perf_counter() - start
    result = learn_step(engine, thoughts, config, policy_version, all_reduce_sum, world_size)
    seconds = time.perf_counter() - start
    result.metrics.update(step_timings(rollout_seconds, result.metrics["time/learn"], gather_seconds, seconds))
    result.metrics.update(throughput(result.metrics, seconds))
    return result


def learn_step(
    engine,
    thoughts: list[ThoughtBatch],
    config: Config,
    policy_version: int,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    world_size: int,
) -> StepResult:
    """Score with gradients, losses, backward and one optimizer step over this rank's micro-batches
    (gradient accumulation), whoever sampled the thoughts. `policy_version` is the optimizer steps taken
    by the weights about to be updated; thoughts sampled by older weights are stale by the difference, and
    their policy term is importance-corrected per token by min(p_learner / p_rollout, loss.is_cap)."""
    # The learning phase starts here in every placement: rollout and evaluation leave the model in eval
    # mode, and HF models load in eval mode, but activation checkpointing only runs in train mode.
    engine.module.train()
    # Every loss is a sum over this rank's tokens divided by the global count of valid positions, times
    # world * accumulation to undo DeepSpeed's mean over ranks and micro-batches: the gradient is then
    # the gradient of the mean over the global batch, whatever the split.
    local_valid = sum(valid_positions(t.attention_mask, config.thought.talk_length).sum() for t in thoughts)
    num_valid = all_reduce_sum(torch.as_tensor(local_valid, dtype=torch.float64)).clamp(min=1)
    undo_mean = world_size * len(thoughts)
    losses = torch.zeros(4, dtype=torch.float64)  # total, policy, nll_base, nll_talk
    sums = None
    samples: list[dict] = []
    lr = engine.get_lr()[0]  # the rate this step uses; the last step() below advances the schedule
    learn_start = time.perf_counter()
    for t in thoughts:
        out = engine(t.input_ids, t.thought_ids, t.attention_mask)  # ScoreOutput, (B, R, T, ...)
        if t.thought_ids is None:  # loss.objective 'nll': the thought-free control, the base NLL alone
            loss = nll_only_loss(out.base_logprobs, out.valid, num_valid)
        else:
            loss, is_weight, is_clipped = thinking_loss(out, t, config, policy_version, num_valid)
        engine.backward(loss.total * undo_mean)
        engine.step()  # DeepSpeed's protocol: every micro-batch; the update happens at the last one
        losses += torch.stack([loss.total, loss.policy, loss.nll_base, loss.nll_talk]).detach().double()
        if t.thought_ids is None:
            continue
        gap = t.thought_logprobs - out.thought_logprobs.detach()  # (B, R, T, M)
        step_sums = statistic_sums(
            loss.reward, loss.advantage, out.valid, gap, out.mixing_weight.detach(), is_weight, is_clipped
        )
        sums = step_sums if sums is None else sums + step_sums
        if not samples:
            samples = _samples(t, loss.reward, out.valid)
    learn_seconds = time.perf_counter() - learn_start

    # Both engines skip the update when the global gradient norm is not finite. That is the only way a step
    # can make finite weights non-finite: AdamW moves a weight by lr * (weight_decay * |w| + |m / sqrt(v)|),
    # and config.py keeps lr and weight_decay <= 1, so no weight scan is needed here (it cost 0.35 s a step).
    grad_norm = float(engine.get_global_grad_norm() or 0.0)
    skipped = not math.isfinite(grad_norm)
    losses = all_reduce_sum(losses)
    thought_tokens = sum(t.thought_ids.numel() for t in thoughts if t.thought_ids is not None)
    counts = torch.tensor([sum(t.input_ids.numel() for t in thoughts), thought_tokens])
    text_tokens, thought_tokens = all_reduce_sum(counts.double()).tolist()
    metrics = {
        **(statistics_from_sums(all_reduce_sum(sums)) if sums is not None else {}),
        "loss/total": losses[0].item(),
        "loss/policy": losses[1].item(),
        "loss/nll_base": losses[2].item(),
        "loss/nll_talk": losses[3].item(),
        "optim/grad_norm": grad_norm,
        "optim/lr": lr,
        "time/learn": learn_seconds,
        # This rank's thoughts; every rollout actor loads each version in the same order, so ranks agree.
        "policy/version": min(t.policy_version for t in thoughts),
        "policy/staleness": policy_version - min(t.policy_version for t in thoughts),
        "tokens/text": text_tokens,
        "tokens/thought": thought_tokens,
    }
    return StepResult(metrics, skipped, samples)


def thinking_loss(
    out: ScoreOutput, t: ThoughtBatch, config: Config, policy_version: int, num_valid: torch.Tensor | None
) -> tuple[QuietStarLoss, torch.Tensor, torch.Tensor]:
    """The method's loss of one micro-batch (means over `num_valid` positions; None: this micro-batch's), and
    the per-token importance weights and where they were capped (the metrics report them). Thoughts sampled by
    older weights (async rollout) get their policy term corrected per token by min(p_learner / p_rollout, C)."""
    if t.policy_version < policy_version:
        is_weight, is_clipped = truncated_importance_weights(
            out.thought_logprobs, t.thought_logprobs, config.loss.is_cap
        )  # (B, R, T, M) each, detached
        token_weights = is_weight
    else:
        # On-policy: the ratio is 1 in exact arithmetic; the learner's recomputation differs from the
        # rollout's by rounding, so it is not computed at all and the loss stays exactly plain REINFORCE.
        is_weight = torch.ones_like(out.thought_logprobs)
        is_clipped = torch.zeros_like(out.thought_logprobs, dtype=torch.bool)
        token_weights = None
    loss = quiet_star_loss(
        out.base_logprobs,
        out.talk_logprobs,
        out.policy_logprobs,
        out.valid,
        nll_base_weight=config.loss.nll_base_weight,
        policy_weight=config.loss.policy_weight,
        positive_advantage_only=config.loss.positive_advantage_only,
        num_valid=num_valid,
        token_weights=token_weights,
    )
    return loss, is_weight, is_clipped


def step_timings(rollout: float, learn: float, weight_sync: float, step: float) -> dict[str, float]:
    """The time/* metrics of one step, in seconds."""
    return {"time/rollout": rollout, "time/learn": learn, "time/weight_sync": weight_sync, "time/step": step}


def throughput(metrics: dict[str, float], step_seconds: float) -> dict[str, float]:
    """perf/* from the step's global token counts (tokens/text, tokens/thought) and its wall time."""
    return {
        "perf/tokens_per_s": metrics["tokens/text"] / step_seconds,
        "perf/thought_tokens_per_s": metrics["tokens/thought"] / step_seconds,
    }


class _Timed(AbstractContextManager):
    """Wraps a context manager and measures how long entering it took (the weight gather)."""

    def __init__(self, inner: AbstractContextManager | None) -> None:
        self.inner, self.seconds = inner, 0.0

    def __enter__(self):
        start = time.perf_counter()
        if self.inner is not None:
            self.inner.__enter__()
        self.seconds = time.perf_counter() - start
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc) if self.inner is not None else None


def _samples(t: ThoughtBatch, reward: torch.Tensor, valid: torch.Tensor, count: int = 4) -> list[dict]:
    """Up to `count` evenly spaced valid positions of the first sequence, with every thought's reward."""
    positions = valid[0].nonzero().flatten().tolist()
    picked = positions[:: max(1, len(positions) // count)][:count]
    return [
        {
            "position": i,
            "context_ids": t.input_ids[0, max(0, i - 15) : i + 1].tolist(),
            "next_ids": t.input_ids[0, i + 1 : i + 5].tolist(),
            "thought_ids": t.thought_ids[0, :, i].tolist(),  # (R, M)
            "rewards": reward[0, :, i].tolist(),  # (R,)
        }
        for i in picked
    ]
