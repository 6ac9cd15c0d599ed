"""core/ math against numbers worked out by hand, and the efficient attention against the dense oracle."""

import pytest
import torch

from qstar_rl.core.attention import branch_attention, branch_attention_dense, dense_branch_mask
from qstar_rl.core.layout import branch_length, branch_position_ids, gather_shifted, valid_positions
from qstar_rl.core.losses import (
    advantages,
    nll_losses,
    policy_loss,
    quiet_star_loss,
    reward_statistics,
    rewards,
    statistic_sums,
    statistics_from_sums,
    truncated_importance_weights,
)
from qstar_rl.core.mixing import MixingHead, mix_logits, token_logprobs


def test_rewards_and_advantages_by_hand():
    talk = torch.tensor([[[[-1.0, -0.5]], [[-2.0, -1.0]], [[-3.0, 0.0]]]])  # (B=1, R=3, T=1, K=2)
    reward = rewards(talk)
    assert reward.flatten().tolist() == [-1.5, -3.0, -3.0]
    # mean = -2.5 -> raw advantages [1.0, -0.5, -0.5]
    assert advantages(reward, positive_only=False).flatten().tolist() == [1.0, -0.5, -0.5]
    assert advantages(reward, positive_only=True).flatten().tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="at least 2"):
        advantages(reward[:, :1])


def test_policy_loss_by_hand():
    adv = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1)  # (B, R, T)
    logp = torch.tensor([-0.5, -1.0, -2.0]).view(1, 3, 1, 1)  # (B, R, T, M=1)
    valid = torch.ones(1, 1, dtype=torch.bool)
    # -(1*-0.5 + 0*-1 + -1*-2) / (1 valid position * 3 thoughts * 1 token) = -(1.5)/3
    assert policy_loss(adv, logp, valid).item() == pytest.approx(-0.5)
    # a global count of 2 valid positions halves it
    assert policy_loss(adv, logp, valid, num_valid=2).item() == pytest.approx(-0.25)
    # an invalid position contributes nothing
    assert policy_loss(adv, logp, torch.zeros(1, 1, dtype=torch.bool), num_valid=1).item() == 0.0


def test_truncated_importance_weights_by_hand():
    rollout = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.1, -4.0]).view(1, 2, 1, 3)  # (B, R, T, M)
    ratios = torch.tensor([1.5, 3.0, 0.25, 20.0, 1.0, 1.0])
    learner = (rollout.flatten() + ratios.log()).view(1, 2, 1, 3)
    learner[0, 1, 0, 2] = 1000.0  # exp(1004) overflows float32: still the cap, and clipped
    learner.requires_grad_(True)
    weight, clipped = truncated_importance_weights(learner, rollout, cap=2.0)
    assert weight.shape == clipped.shape == (1, 2, 1, 3)
    torch.testing.assert_close(weight.flatten(), torch.tensor([1.5, 2.0, 0.25, 2.0, 1.0, 2.0]))
    assert clipped.flatten().tolist() == [False, True, False, True, False, True]
    assert not weight.requires_grad  # a weight on the gradient, never differentiated itself
    # TRL's cap of 3 clips only the ratios above 3
    weight3, clipped3 = truncated_importance_weights(learner, rollout, cap=3.0)
    torch.testing.assert_close(weight3.flatten()[:4], torch.tensor([1.5, 3.0, 0.25, 3.0]))
    assert clipped3.flatten().tolist() == [False, False, False, True, False, True]


def test_policy_loss_with_token_weights_by_hand():
    adv = torch.tensor([1.0, 0.5]).view(1, 2, 1)  # (B=1, R=2, T=1)
    logp = torch.tensor([[-0.5, -1.0], [-2.0, -0.25]]).view(1, 2, 1, 2).requires_grad_(True)  # (B, R, T, M=2)
    weights = torch.tensor([[2.0, 0.5], [1.0, 0.0]]).view(1, 2, 1, 2).requires_grad_(True)
    valid = torch.ones(1, 1, dtype=torch.bool)
    # -(2*1*-0.5 + 0.5*1*-1 + 1*0.5*-2 + 0*0.5*-0.25) / (1 position * 2 thoughts * 2 tokens) = 2.5 / 4
    loss = policy_loss(adv, logp, valid, token_weights=weights)
    assert loss.item() == pytest.approx(0.625)
    loss.backward()
    # d/d logp = -w * A / 4; the weights receive no gradient
    torch.testing.assert_close(logp.grad.flatten(), torch.tensor([-0.5, -0.125, -0.125, 0.0]))
    assert weights.grad is None
    # without weights: exactly the unweighted loss, -(1*-1.5 + 0.5*-2.25) / 4
    plain = policy_loss(adv, logp, valid)
    assert plain.item() == pytest.approx(2.625 / 4)
    assert torch.equal(plain, policy_loss(adv, logp, valid, token_weights=None))
    # and quiet_star_loss hands the weights through
    talk = torch.tensor([-1.0, -2.0]).view(1, 2, 1, 1)  # rewards -1, -2 -> advantages 0.5, 0
    total = quiet_star_loss(torch.zeros(1, 1), talk, logp, valid, token_weights=weights)
    by_hand = -(2.0 * 0.5 * -0.5 + 0.5 * 0.5 * -1.0) / 4
    assert total.policy.item() == pytest.approx(by_hand)


def test_importance_statistics_add_up_exactly_across_micro_batches():
    reward = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 2, 2)  # (B=1, R=2, T=2)
    adv = advantages(reward, positive_only=False)
    valid = torch.tensor([[True, False]])  # position 1 is not counted
    weight = torch.tensor([[[1.5, 2.0], [7.0, 7.0]], [[0.25, 2.0], [7.0, 7.0]]]).view(1, 2, 2, 2)  # (B, R, T, M)
    clipped = weight == 2.0
    stale = statistic_sums(reward, adv, valid, is_weight=weight, is_clipped=clipped)
    ones, none_clipped = torch.ones(1, 2, 2, 2), torch.zeros_like(clipped)
    on_policy = statistic_sums(reward, adv, valid, is_weight=ones, is_clipped=none_clipped)
    stats = statistics_from_sums(stale + on_policy)
    # 4 stale tokens (1.5, 2, 0.25, 2; two clipped) and 4 on-policy tokens of weight 1 at the valid position
    assert stats["policy/is_weight_mean"] == pytest.approx((1.5 + 2.0 + 0.25 + 2.0 + 4.0) / 8)
    assert stats["policy/is_clipped_frac"] == pytest.approx(2 / 8)
    assert statistics_from_sums(on_policy)["policy/is_weight_mean"] == 1.0
    assert statistics_from_sums(on_policy)["policy/is_clipped_frac"] == 0.0
    unmeasured = reward_statistics(reward, adv, valid)
    assert unmeasured["policy/is_weight_mean"] != unmeasured["policy/is_weight_mean"]  # NaN: nothing measured


def test_nll_losses_and_total_by_hand():
    base = torch.tensor([[-1.0, -2.0, -4.0]])  # (B=1, T=3)
    valid = torch.tensor([[True, True, False]])
    talk = torch.tensor([-1.0, -3.0, -2.0, -2.0]).view(1, 1, 1, 4).expand(1, 2, 3, 4).clone()  # (B, R, T, K)
    nll_base, nll_talk = nll_losses(base, talk, valid)
    assert nll_base.item() == pytest.approx(1.5)  # (1 + 2) / 2
    assert nll_talk.item() == pytest.approx(2.0)  # mean of 1, 3, 2, 2
    policy_lp = torch.full((1, 2, 3, 1), -1.0)
    loss = quiet_star_loss(base, talk, policy_lp, valid, nll_base_weight=0.5, policy_weight=10.0)
    # equal thoughts -> zero advantages -> policy 0; total = 0.5*1.5 + 0.5*2.0
    assert loss.policy.item() == 0.0 and loss.total.item() == pytest.approx(1.75)


def test_token_logprobs_and_mixing_by_hand():
    logits = torch.tensor([0.0, 0.0, torch.log(torch.tensor(2.0)).item()])  # probs 1/4, 1/4, 1/2
    assert token_logprobs(logits, torch.tensor(2)).item() == pytest.approx(torch.log(torch.tensor(0.5)).item())
    # temperature 2 on logits [0, 0, 2 ln 2] -> [0, 0, ln 2]
    hot = token_logprobs(logits * 2, torch.tensor(2), temperature=2.0)
    assert hot.item() == pytest.approx(torch.log(torch.tensor(0.5)).item())
    mixed = mix_logits(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0]), torch.tensor(0.25))
    assert mixed.tolist() == [1.5, 2.0, 2.5]
    head = MixingHead(4)
    assert head(torch.randn(5, 4), torch.randn(5, 4)).abs().max().item() == 0.0


def test_reward_statistics_by_hand():
    reward = torch.tensor([[[1.0, 5.0]], [[3.0, 7.0]]]).permute(1, 0, 2)  # (B=1, R=2, T=2)
    valid = torch.tensor([[True, False]])
    stats = reward_statistics(reward, advantages(reward, positive_only=False), valid)
    assert stats["reward/mean"] == pytest.approx(2.0)  # rewards 1 and 3 at the valid position
    assert stats["reward/var_within_position"] == pytest.approx(1.0)
    assert stats["advantage/frac_positive"] == pytest.approx(0.5)


def test_valid_positions_and_layout():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert valid_positions(mask, 2).int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert branch_length(3, 2) == 6
    # steps 1..2 of R=2 branches over T=3 positions: position i + 1 + step, step-major
    assert branch_position_ids(2, 2, 3, first_step=1).tolist() == [2, 3, 4, 2, 3, 4, 3, 4, 5, 3, 4, 5]
    x = torch.arange(5).view(1, 5)
    assert gather_shifted(x, range(1, 3)).tolist() == [[[1, 2, 3, 4, 4], [2, 3, 4, 4, 4]]]


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("q_steps,k_steps", [(5, 5), (1, 3), (1, 1)])
def test_efficient_attention_equals_dense_oracle(heads, kv_heads, q_steps, k_steps):
    gen = torch.Generator().manual_seed(0)
    batch, seq_len, num_thoughts, head_dim = 2, 7, 3, 5
    branches = num_thoughts * seq_len

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rand(batch, heads, q_steps * branches, head_dim)
    k_text, v_text = rand(batch, kv_heads, seq_len, head_dim), rand(batch, kv_heads, seq_len, head_dim)
    k_branch = rand(batch, kv_heads, k_steps * branches, head_dim)
    v_branch = rand(batch, kv_heads, k_steps * branches, head_dim)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()
    args = (q, k_text, v_text, k_branch, v_branch, text_mask, num_thoughts, 0.3)
    torch.testing.assert_close(branch_attention(*args), branch_attention_dense(*args), atol=1e-10, rtol=0)


def test_dense_mask_by_hand():
    # T=2, R=1, one step: query of branch t sees text keys <= t and itself
    mask = dense_branch_mask(torch.tensor([[1, 1]]), num_thoughts=1, q_steps=1, k_steps=1)
    assert mask.int().tolist() == [[[1, 0, 1, 0], [1, 1, 0, 1]]]
