"""The mixing head and logit-space mixing of the base and post-thought predictions."""

import torch
import torch.nn.functional as F
from torch import nn


class MixingHead(nn.Module):
    """MLP 2D -> D -> D -> 1 with ReLU on [h_base ; h_talk]. The last layer starts at zero, so the mixing
    weight is 0 and the mixed prediction equals the base model's exactly at initialisation.

    Initialised as the authors' code does (their LM's `_init_weights`): hidden layers normal(0, init_std) with
    zero biases, where init_std is the LM's `initializer_range`. PyTorch's default init (uniform with
    bound 1/sqrt(fan_in)) would make the penultimate activations ~7x smaller at D=4096, so the weight w
    would open ~7x more slowly per Adam step than in the paper's run.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, 1),
        )
        for layer in (self.net[0], self.net[2]):
            nn.init.normal_(layer.weight, mean=0.0, std=init_std)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, base_hidden: torch.Tensor, talk_hidden: torch.Tensor) -> torch.Tensor:
        """(..., D), (..., D) -> (...,) mixing weight w."""
        return self.net(torch.cat([base_hidden, talk_hidden], dim=-1)).squeeze(-1)


def mix_logits(base_logits: torch.Tensor, talk_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(1 - w) * z_base + w * z_talk in logit space, always in fp32; weight has the logits' shape without the
    last V axis. In bf16 the sum would round the thought's share away while w is small (it starts at 0): at
    w = 1e-3 most reward differences between two thoughts would come out exactly 0."""
    w = weight.float().unsqueeze(-1)
    return (1 - w) * base_logits.float() + w * talk_logits.float()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[targets] in fp32; logits (..., V), targets (...) -> (...).

    Through cross_entropy, whose fused log-softmax kernel is ~1.4x faster than gather - logsumexp on CPU
    forward and ~1.6x with backward: with V = 49,152 and D = 576 these V-wide passes cost a fair share of
    the LM head's own matrix product."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    return -F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def restricted_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log p(target) with the softmax restricted to the `allowed` token ids (A,) (the paper's eval metric
    over valid answer tokens); -inf where the target is not allowed. logits (..., V), targets (...) -> (...)."""
    logits = logits.float()[..., allowed]  # (..., A)
    is_target = allowed == targets.unsqueeze(-1)  # (..., A)
    return logits.masked_fill(~is_target, -torch.inf).logsumexp(-1) - logits.logsumexp(-1)
