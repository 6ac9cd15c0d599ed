"""Where every branch token sits: its index inside the branch, its position id, and which positions count.

A branch for text position i and thought j is  <sot>, c_1..c_M, <eot>, x_{i+1}..x_{i+K-1}  (L = M + K + 1
tokens) at position ids i+1 .. i+L. Branch tokens are laid out *step-major*: all R*T branches' token l come
before any branch's token l+1, so the layout is (L, R, T) with T fastest. Decoding appends one (R, T) slab
per step, scoring feeds all L slabs at once, and attention sees the same layout in both cases.
"""

import torch


def branch_length(length: int, talk_length: int) -> int:
    """L = M + K + 1: <sot>, M thought tokens, <eot>, then K-1 true text tokens."""
    return length + talk_length + 1


def branch_position_ids(num_steps: int, num_thoughts: int, seq_len: int, first_step: int = 0) -> torch.Tensor:
    """Position ids of branch steps first_step..first_step+num_steps-1, flattened step-major: (S*R*T,)."""
    steps = torch.arange(first_step, first_step + num_steps).view(-1, 1, 1)  # (S, 1, 1)
    text_pos = torch.arange(seq_len).view(1, 1, -1)  # (1, 1, T)
    return (text_pos + 1 + steps).expand(num_steps, num_thoughts, seq_len).reshape(-1)  # (S*R*T,)


def valid_positions(attention_mask: torch.Tensor, talk_length: int) -> torch.Tensor:
    """(B, T) bool: position i is valid when x_{i+1..i+K} all lie inside the window and are real tokens."""
    real = attention_mask.bool()  # (B, T)
    seq_len = real.shape[1]
    valid = torch.zeros_like(real)
    if seq_len <= talk_length:
        return valid
    ok = real[:, : seq_len - talk_length].clone()  # x_i itself is real
    for s in range(1, talk_length + 1):
        ok &= real[:, s : seq_len - talk_length + s]
    valid[:, : seq_len - talk_length] = ok
    return valid


def shifted_index(seq_len: int, offset: int) -> torch.Tensor:
    """(T,) indices i+offset clamped into the window; out-of-window entries are masked by `valid` later."""
    return (torch.arange(seq_len) + offset).clamp(max=seq_len - 1)


def gather_shifted(x: torch.Tensor, offsets: range) -> torch.Tensor:
    """x (B, T, ...) -> (B, len(offsets), T, ...) with entry [b, s, i] = x[b, min(i+offsets[s], T-1)]."""
    seq_len = x.shape[1]
    if len(offsets) == 0:
        return x.new_empty((x.shape[0], 0, *x.shape[1:]))
    return torch.stack([x[:, shifted_index(seq_len, o).to(x.device)] for o in offsets], dim=1)
