"""Where thinking helps: per-token NLL changes grouped by how hard each token is for the base model."""

import torch


def difficulty_deciles(base_nll: torch.Tensor, think_nll: torch.Tensor, groups: int = 10) -> list[dict[str, float]]:
    """Tokens sorted by base NLL (N,) and cut into `groups` groups of (nearly) equal size, easiest first.
    Per group: tokens, base NLL range and mean, thinking NLL mean, mean change (thinking - base; negative
    means the thought helped) and the fraction of tokens the thought helped."""
    if base_nll.shape != think_nll.shape or base_nll.dim() != 1:
        raise ValueError(f"need two (N,) tensors, got {tuple(base_nll.shape)} and {tuple(think_nll.shape)}")
    order = base_nll.double().argsort()
    base, think = base_nll.double()[order], think_nll.double()[order]
    rows = []
    for index, part in enumerate(torch.tensor_split(torch.arange(len(base)), groups)):
        if len(part) == 0:
            continue
        b, t = base[part], think[part]
        rows.append(
            {
                "decile": index + 1,
                "tokens": len(part),
                "base_nll_min": b.min().item(),
                "base_nll_max": b.max().item(),
                "base_nll": b.mean().item(),
                "think_nll": t.mean().item(),
                "delta_nll": (t - b).mean().item(),
                "frac_helped": (t < b).double().mean().item(),
            }
        )
    return rows
