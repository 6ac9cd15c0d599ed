"""Typed configuration. Each field carries a one-line docstring (the string right below it)."""

from dataclasses import dataclass


@dataclass
class ThoughtConfig:
    """How thoughts are sampled and scored (DESIGN.md section 1; letters R, M, K)."""

    num_thoughts: int = 2
    """R: thoughts sampled per position; the mean baseline needs R >= 2."""
    length: int = 9
    """M: sampled thought tokens between <sot> and <eot>."""
    talk_length: int = 4
    """K: true future tokens scored after each thought (non-myopic reward)."""
    init_token: str = "---"
    """Text whose first token's input embedding initialises <sot> and <eot>."""
    init_token_id: int | None = None
    """Token id to initialise the meta tokens from when no tokenizer is given (None: mean embedding)."""
    sample_temperature: float = 1.0
    """tau_sample: temperature of thought sampling during training."""
    reinforce_temperature: float = 3.0
    """tau_reinforce: temperature of the thought log-probs inside the policy-gradient loss."""
    embedding_lr_multiplier: float = 100.0
    """Learning-rate multiplier of the <sot>/<eot> embeddings."""
    attention: str = "efficient"
    """Branch attention path: 'efficient' (default, linear memory in M and K) or 'dense' (test oracle)."""


@dataclass
class LossConfig:
    """How rewards become losses."""

    nll_base_weight: float = 0.5
    """alpha in alpha * NLL_base + (1 - alpha) * mean_s NLL_mixed(s)."""
    policy_weight: float = 1e6
    """Weight of the REINFORCE loss in the total (the paper uses 1e6)."""
    positive_advantage_only: bool = True
    """Clamp advantages at 0, as the paper does."""
