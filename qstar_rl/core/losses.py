"""Rewards, mean-baselined advantages, the REINFORCE loss and the NLL losses (DESIGN.md section 1).

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


def policy_loss(
    advantage: torch.Tensor,
    policy_logprobs: torch.Tensor,
    valid: torch.Tensor,
    num_valid: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """-A_j(i) * log pi(c_{m+1}) averaged over thought tokens, thoughts and valid positions.

    advantage (B, R, T) detached; policy_logprobs (B, R, T, M) at tau_reinforce; valid (B, T) bool.
    """
    _, num_thoughts, _, length = policy_logprobs.shape
    weight = advantage.detach() * valid[:, None, :]  # (B, R, T)
    total = -(weight.unsqueeze(-1) * policy_logprobs).sum()
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
    reward: torch.Tensor  # (B, R, T)
    advantage: torch.Tensor  # (B, R, T)


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
) -> QuietStarLoss:
    """Total = alpha * NLL_base + (1 - alpha) * NLL_talk + policy_weight * policy loss."""
    reward = rewards(talk_logprobs)
    advantage = advantages(reward, positive_advantage_only)
    nll_base, nll_talk = nll_losses(base_logprobs, talk_logprobs, valid, num_valid)
    nll = nll_base_weight * nll_base + (1 - nll_base_weight) * nll_talk
    policy = policy_loss(advantage, policy_logprobs, valid, num_valid)
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
)
"""What `statistic_sums` adds up, in order; sums add across micro-batches and ranks."""


def statistic_sums(
    reward: torch.Tensor,
    advantage: torch.Tensor,
    valid: torch.Tensor,
    logprob_gap: torch.Tensor | None = None,
    mixing_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """(len(STATISTIC_SUMS),) float64 sums over valid positions, for metrics that stay exact after an
    all-reduce. reward/advantage (B, R, T); logprob_gap (B, R, T, M) rollout minus learner log-probs;
    mixing_weight (B, R, T, K)."""
    mask = valid[:, None, :].expand_as(reward)  # (B, R, T)
    r = reward[mask].double()
    a = advantage[mask].double()
    within = reward.double().var(dim=1, unbiased=False)[valid]  # (valid positions,)
    gap = logprob_gap.abs().double().mean(dim=-1)[mask].sum() if logprob_gap is not None else r.new_zeros(())
    weight = mixing_weight.double().mean(dim=-1)[mask].sum() if mixing_weight is not None else r.new_zeros(())
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
        ]
    )


def statistics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Metric values from (possibly all-reduced) `statistic_sums`; NaN when no position was valid."""
    s = dict(zip(STATISTIC_SUMS, sums.tolist(), strict=True))
    n, positions = s["count"], s["positions"]
    if n == 0:
        nan = float("nan")
        return dict.fromkeys(
            [
                "reward/mean",
                "reward/std",
                "reward/var_within_position",
                "advantage/mean",
                "advantage/frac_positive",
                "thought/logprob_gap",
                "mixing/weight_mean",
            ],
            nan,
        )
    mean = s["reward"] / n
    return {
        "reward/mean": mean,
        "reward/std": max(s["reward_sq"] / n - mean * mean, 0.0) ** 0.5,
        "reward/var_within_position": s["var_within"] / positions,
        "advantage/mean": s["advantage"] / n,
        "advantage/frac_positive": s["advantage_positive"] / n,
        "thought/logprob_gap": s["logprob_gap"] / n,
        "mixing/weight_mean": s["mixing_weight"] / n,
    }


def reward_statistics(reward: torch.Tensor, advantage: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """Reward and advantage metrics of one micro-batch (see `statistic_sums`)."""
    return statistics_from_sums(statistic_sums(reward, advantage, valid))
