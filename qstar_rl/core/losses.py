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


def reward_statistics(reward: torch.Tensor, advantage: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """Local metric values over valid positions: reward mean/std, variance across the R thoughts of a
    position (averaged over positions), advantage mean and the fraction of strictly positive advantages."""
    mask = valid[:, None, :].expand_as(reward)  # (B, R, T)
    if not mask.any():
        nan = float("nan")
        return dict.fromkeys(
            ["reward/mean", "reward/std", "reward/var_within_position", "advantage/mean", "advantage/frac_positive"],
            nan,
        )
    picked = reward[mask]
    within = reward.var(dim=1, unbiased=False)[valid]  # (num valid positions,)
    return {
        "reward/mean": picked.mean().item(),
        "reward/std": picked.std(unbiased=False).item(),
        "reward/var_within_position": within.mean().item(),
        "advantage/mean": advantage[mask].mean().item(),
        "advantage/frac_positive": (advantage[mask] > 0).float().mean().item(),
    }
