"""Rollout: sample R thoughts at every position of a batch of windows, without gradients.

`ThoughtBatch` is the one record that rollout hands to the learner (and, under Ray, what crosses the
object store): the text, the sampled thought tokens, their log-probs under the sampling policy, and the
version of the weights that sampled them.
"""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from qstar_rl.model import ThinkingLM


@dataclass
class ThoughtBatch:
    """Sampled thoughts for one micro-batch."""

    input_ids: torch.Tensor
    """(B, T) text windows."""
    attention_mask: torch.Tensor
    """(B, T) 1 for real tokens, 0 for right padding."""
    thought_ids: torch.Tensor | None
    """(B, R, T, M) sampled thought tokens; None for the thought-free control (loss.objective 'nll')."""
    thought_logprobs: torch.Tensor | None
    """(B, R, T, M) their log-probs (temperature 1) under the weights that sampled them."""
    policy_version: int
    """Optimizer steps taken by the weights that sampled them."""

    def to(self, device: torch.device | str) -> "ThoughtBatch":
        thoughts = [None if t is None else t.to(device) for t in (self.thought_ids, self.thought_logprobs)]
        return ThoughtBatch(self.input_ids.to(device), self.attention_mask.to(device), *thoughts, self.policy_version)


def sequence_generators(seed: int, window_ids: torch.Tensor, device: torch.device) -> list[torch.Generator]:
    """One generator per sequence, seeded by the run seed and the window's global id: a window gets the
    same thoughts whichever rank or actor samples it and whatever it is batched with."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(w)) for w in window_ids]


def rollout(
    model: ThinkingLM,
    batch: dict[str, torch.Tensor],
    seed: int,
    policy_version: int,
    full_weights: AbstractContextManager | None = None,
    think: bool = True,
) -> ThoughtBatch:
    """Sample thoughts for one micro-batch (input_ids, attention_mask, window_ids). `full_weights` is
    entered around sampling: under ZeRO-3 it gathers the partitioned weights once, instead of one
    all-gather per layer at each of the M decode steps. think=False (loss.objective 'nll') samples nothing."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if not think:
        return ThoughtBatch(input_ids, attention_mask, None, None, policy_version)
    generators = sequence_generators(seed, batch["window_ids"], input_ids.device)
    model.eval()  # the sampling phase; the learner sets train mode where its phase starts (learn_step)
    with full_weights or nullcontext():
        thought_ids, logprobs = model.sample_thoughts(input_ids, attention_mask, generator=generators)
    return ThoughtBatch(input_ids, attention_mask, thought_ids, logprobs, policy_version)
