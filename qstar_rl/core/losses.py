"""Rewards, mean-baselined advantages, the REINFORCE loss and the NLL losses (docs/design.md section 1), and the
truncated importance weights that correct the policy gradient of thoughts sampled by older weights.

Every mean divides by a count passed in (`num_valid`: valid positions, summed over all data-parallel
ranks by the caller), so that ranks that hold different numbers of valid positions still add up to the
mean of the global batch. With num_valid=None the local count is used.
"""

from dataclasses import dataclass

import torch


def rewards(talk_logprobs: torch.Tensor) -> torch.Tensor:
    """(B, R, T, K) log p_mixed of the K true future tokens -> (B, R, T) reward R_j(i), detached."""
    return talk_logprobs.detach().sum(dim=-1)


def advantages(reward: torch.Tensor, positive_only: bool = True) -> torch.Tensor:
    """(B, R, T) -> (B, R, T): reward minus the mean over the R thoughts of the same position."""
    if reward.shape[1] < 2:
        raise ValueError(f"the mean baseline needs at least 2 thoughts per position, got R={reward.shape[1]}")
    adv = reward - reward.mean(dim=1, keepdim=True)
    return adv.clamp(min=0) if positive_only else adv


def _count(valid: torch.Tensor, num_valid: float | torch.Tensor | None) -> float | torch.Tensor:
    return valid.sum().clamp(min=1) if num_valid is None else num_valid


def truncated_importance_weights(
    learner_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token truncated importance weights min(p_learner / p_rollout, cap) and where the cap bit.

    learner_logprobs, rollout_logprobs (B, R, T, M): log-probs of the same sampled thought tokens under the
    weights being updated and under the (older) weights that sampled them. Returns (weight, clipped), both
    (B, R, T, M) and detached: the weight rescales each token's policy-gradient term and must not itself
    be differentiated (truncated IS as in verl / slime). A one-sided cap bounds the variance that rare
    tokens, much likelier now than when sampled, would otherwise bring in.
    """
    ratio = (learner_logprobs.detach() - rollout_logprobs.detach()).exp()  # (B, R, T, M); may overflow to inf
    clipped = ratio > cap
    return ratio.clamp(max=cap), clipped


def policy_loss(
    advantage: torch.Tensor,
    policy_logprobs: torch.Tensor,
    valid: torch.Tensor,
    num_valid: float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """-w_{m+1} * A_j(i) * log pi(c_{m+1}) averaged over thought tokens, thoughts and valid positions.

    advantage (B, R, T) detached; policy_logprobs (B, R, T, M) at tau_reinforce; valid (B, T) bool;
    token_weights (B, R, T, M) detached importance weights, or None for plain REINFORCE (w = 1, computed
    exactly as without weights, so on-policy losses are bit for bit unchanged).
    """
    _, num_thoughts, _, length = policy_logprobs.shape
    weight = advantage.detach() * valid[:, None, :]  # (B, R, T)
    terms = weight.unsqueeze(-1) * policy_logprobs  # (B, R, T, M)
    if token_weights is not None:
        terms = token_weights.detach() * terms
    total = -terms.sum()
    return total / (_count(valid, num_valid) * num_thoughts * length)


def nll_losses(
    base_logprobs: torch.Tensor,
    talk_logprobs: torch.Tensor,
    valid: torch.Tensor,
    num_valid: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL of the base model on x_{i+1}, mean over s of the NLL of the mixed prediction of x_{i+s+1}).

    base_logprobs (B, T); talk_logprobs (B, R, T, K); both averaged over valid positions (and R, K).
    """
    _, num_thoughts, _, talk_length = talk_logprobs.shape
    count = _count(valid, num_valid)
    nll_base = -(base_logprobs * valid).sum() / count
    nll_talk = -(talk_logprobs * valid[:, None, :, None]).sum() / (count * num_thoughts * talk_length)
    return nll_base, nll_talk


@dataclass
class QuietStarLoss:
    """The scalar losses of one micro-batch and the detached reward/advantage tensors behind them."""

    total: torch.Tensor
    policy: torch.Tensor
    nll: torch.Tensor
    nll_base: torch.Tensor
    nll_talk: torch.Tensor
    reward: torch.Tensor | None  # (B, R, T); None without thoughts
    advantage: torch.Tensor | None  # (B, R, T)


def quiet_star_loss(
    base_logprobs: torch.Tensor,
    talk_logprobs: torch.Tensor,
    policy_logprobs: torch.Tensor,
    valid: torch.Tensor,
    *,
    nll_base_weight: float = 0.5,
    policy_weight: float = 1.0,
    positive_advantage_only: bool = True,
    num_valid: float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> QuietStarLoss:
    """Total = alpha * NLL_base + (1 - alpha) * NLL_talk + policy_weight * policy loss.

    token_weights (B, R, T, M): detached per-token importance weights of the policy term (None: plain
    REINFORCE, for thoughts sampled by the weights being updated)."""
    reward = rewards(talk_logprobs)
    advantage = advantages(reward, positive_advantage_only)
    nll_base, nll_talk = nll_losses(base_logprobs, talk_logprobs, valid, num_valid)
    nll = nll_base_weight * nll_base + (1 - nll_base_weight) * nll_talk
    policy = policy_loss(advantage, policy_logprobs, valid, num_valid, token_weights)
    return QuietStarLoss(nll + policy_weight * policy, policy, nll, nll_base, nll_talk, reward, advantage)


STATISTIC_SUMS = (
    "count",
    "reward",
    "reward_sq",
    "positions",
    "var_within",
    "advantage",
    "advantage_positive",
    "logprob_gap",
    "mixing_weight",
    "is_tokens",
    "is_weight",
    "is_clipped",
)
"""What `statistic_sums` adds up, in order; sums add across micro-batches and ranks."""


def statistic_sums(
    reward: torch.Tensor,
    advantage: torch.Tensor,
    valid: torch.Tensor,
    logprob_gap: torch.Tensor | None = None,
    mixing_weight: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    is_clipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """(len(STATISTIC_SUMS),) float64 sums over valid positions, for metrics that stay exact after an
    all-reduce. reward/advantage (B, R, T); logprob_gap (B, R, T, M) rollout minus learner log-probs;
    mixing_weight (B, R, T, K); is_weight (B, R, T, M) importance weights of the policy term with
    is_clipped (B, R, T, M) bool where the cap applied (None: no weights measured, no thought tokens counted)."""
    mask = valid[:, None, :].expand_as(reward)  # (B, R, T)
    r = reward[mask].double()
    a = advantage[mask].double()
    within = reward.double().var(dim=1, unbiased=False)[valid]  # (valid positions,)
    gap = logprob_gap.abs().double().mean(dim=-1)[mask].sum() if logprob_gap is not None else r.new_zeros(())
    weight = mixing_weight.double().mean(dim=-1)[mask].sum() if mixing_weight is not None else r.new_zeros(())
    if is_weight is not None:
        w = is_weight.detach().double()[mask]  # (valid positions * R, M)
        is_sums = [r.new_tensor(float(w.numel())), w.sum(), is_clipped[mask].double().sum()]
    else:
        is_sums = [r.new_zeros(())] * 3
    return torch.stack(
        [
            r.new_tensor(float(r.numel())),
            r.sum(),
            (r * r).sum(),
            r.new_tensor(float(within.numel())),
            within.sum(),
            a.sum(),
            (a > 0).double().sum(),
            gap,
            weight,
            *is_sums,
        ]
    )


def statistics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Metric values from (possibly all-reduced) `statistic_sums`; NaN when no position was valid (the
    importance-weight metrics: when no weights were measured)."""
    s = dict(zip(STATISTIC_SUMS, sums.tolist(), strict=True))
    n, positions, tokens = s["count"], s["positions"], s["is_tokens"]
    nan = float("nan")
    importance = {
        "policy/is_weight_mean": s["is_weight"] / tokens if tokens else nan,
        "policy/is_clipped_frac": s["is_clipped"] / tokens if tokens else nan,
    }
    if n == 0:
        keys = [
            "reward/mean",
            "reward/std",
            "reward/var_within_position",
            "advantage/mean",
            "advantage/frac_positive",
            "thought/logprob_gap",
            "mixing/weight_mean",
        ]
        return dict.fromkeys(keys, nan) | importance
    mean = s["reward"] / n
    return {
        "reward/mean": mean,
        "reward/std": max(s["reward_sq"] / n - mean * mean, 0.0) ** 0.5,
        "reward/var_within_position": s["var_within"] / positions,
        "advantage/mean": s["advantage"] / n,
        "advantage/frac_positive": s["advantage_positive"] / n,
        "thought/logprob_gap": s["logprob_gap"] / n,
        "mixing/weight_mean": s["mixing_weight"] / n,
        **importance,
    }


def reward_statistics(reward: torch.Tensor, advantage: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """Reward and advantage metrics of one micro-batch (see `statistic_sums`)."""
    return statistics_from_sums(statistic_sums(reward, advantage, valid))


def nll_only_loss(
    base_logprobs: torch.Tensor, valid: torch.Tensor, num_valid: float | torch.Tensor | None = None
) -> QuietStarLoss:
    """The thought-free control (loss.objective 'nll'): total = NLL_base over the same valid positions as the
    method's, so the two runs' loss/nll_base compare; the thought terms are 0 and there is no reward.

    base_logprobs (B, T); valid (B, T) bool."""
    nll_base = -(base_logprobs * valid).sum() / _count(valid, num_valid)
    zero = torch.zeros_like(nll_base)
    return QuietStarLoss(nll_base, zero, nll_base, nll_base, zero, None, None)
