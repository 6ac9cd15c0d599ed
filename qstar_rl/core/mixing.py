"""The mixing head and logit-space mixing of the base and post-thought predictions."""

import torch
from torch import nn


class MixingHead(nn.Module):
    """MLP 2D -> D -> D -> 1 with ReLU on [h_base ; h_talk]. The last layer starts at zero, so the mixing
    weight is 0 and the mixed prediction equals the base model's exactly at initialisation."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, base_hidden: torch.Tensor, talk_hidden: torch.Tensor) -> torch.Tensor:
        """(..., D), (..., D) -> (...,) mixing weight w."""
        return self.net(torch.cat([base_hidden, talk_hidden], dim=-1)).squeeze(-1)


def mix_logits(base_logits: torch.Tensor, talk_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(1 - w) * z_base + w * z_talk, in logit space; weight has the logits' shape without the last V axis."""
    w = weight.unsqueeze(-1)
    return (1 - w) * base_logits + w * talk_logits


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[targets]; logits (..., V), targets (...) -> (...)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - logits.logsumexp(dim=-1)


def restricted_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log p(target) with the softmax restricted to the `allowed` token ids (A,) (the paper's eval metric
    over valid answer tokens); -inf where the target is not allowed. logits (..., V), targets (...) -> (...)."""
    logits = logits.float()[..., allowed]  # (..., A)
    is_target = allowed == targets.unsqueeze(-1)  # (..., A)
    return logits.masked_fill(~is_target, -torch.inf).logsumexp(-1) - logits.logsumexp(-1)
