"""Attention of branch tokens: causal over the T text keys, plus the keys of their own branch, one softmax.

Shapes: q (B, H, Sq*N, d) with N = R*T branches per sequence, laid out step-major (see layout.py); the
queries are the last Sq of Sk branch steps. Text keys/values (B, Hkv, T, d); branch keys/values
(B, Hkv, Sk*N, d). Grouped-query attention is handled by viewing the H query heads as (Hkv, G); K/V are
never repeated.

`branch_attention` is the default path: its score tensors are (Sq*N, T) and (Sq*N, Sk), so memory grows
linearly in the branch length. `branch_attention_dense` builds the full (Sq*N, T + Sk*N) mask and is only
the test oracle.
"""

import torch


def branch_attention(
    q: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    k_branch: torch.Tensor,
    v_branch: torch.Tensor,
    text_key_mask: torch.Tensor,
    num_thoughts: int,
    scale: float,
) -> torch.Tensor:
    """Returns (B, H, Sq*N, d). text_key_mask (B, T) bool marks real text tokens."""
    batch, heads, num_q, head_dim = q.shape
    kv_heads, seq_len = k_text.shape[1], k_text.shape[2]
    groups = heads // kv_heads
    branches = num_thoughts * seq_len  # N
    q_steps, k_steps = num_q // branches, k_branch.shape[2] // branches  # Sq, Sk

    qg = q.view(batch, kv_heads, groups, q_steps, num_thoughts, seq_len, head_dim)  # (B, Hkv, G, Sq, R, T, d)
    scores_text = torch.einsum("bkgsrtd,bkud->bkgsrtu", qg, k_text) * scale  # (B, Hkv, G, Sq, R, T, T)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()  # (T query, T key)
    text_allowed = causal[None] & text_key_mask[:, None, :].bool()  # (B, T, T)
    scores_text = scores_text.masked_fill(~text_allowed[:, None, None, None, None], float("-inf"))
    scores_text = scores_text.view(batch, kv_heads, groups, q_steps, branches, seq_len)  # (B, Hkv, G, Sq, N, T)

    qn = q.view(batch, kv_heads, groups, q_steps, branches, head_dim)  # (B, Hkv, G, Sq, N, d)
    kb = k_branch.view(batch, kv_heads, k_steps, branches, head_dim)  # (B, Hkv, Sk, N, d)
    vb = v_branch.view(batch, kv_heads, k_steps, branches, head_dim)
    scores_branch = torch.einsum("bkgsnd,bkpnd->bkgsnp", qn, kb) * scale  # (B, Hkv, G, Sq, N, Sk)
    # query step s (counted from the end) sees its own branch's steps 0..Sk-Sq+s
    q_step = torch.arange(k_steps - q_steps, k_steps, device=q.device)
    branch_allowed = torch.arange(k_steps, device=q.device)[None, :] <= q_step[:, None]  # (Sq, Sk)
    scores_branch = scores_branch.masked_fill(~branch_allowed[:, None, :], float("-inf"))

    softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 scores are normalised in fp32
    probs = torch.cat([scores_text, scores_branch], dim=-1).softmax(dim=-1, dtype=softmax_dtype).to(q.dtype)
    probs_text, probs_branch = probs.split([seq_len, k_steps], dim=-1)
    out = torch.einsum("bkgsnu,bkud->bkgsnd", probs_text, v_text)  # (B, Hkv, G, Sq, N, d)
    out = out + torch.einsum("bkgsnp,bkpnd->bkgsnd", probs_branch, vb)
    return out.reshape(batch, heads, num_q, head_dim)


def dense_branch_mask(text_key_mask: torch.Tensor, num_thoughts: int, q_steps: int, k_steps: int) -> torch.Tensor:
    """(B, Sq*N, T + Sk*N) bool: the same pattern as `branch_attention`, written out densely (oracle only)."""
    seq_len = text_key_mask.shape[1]
    device = text_key_mask.device
    branches = num_thoughts * seq_len
    q_text_pos = torch.arange(seq_len, device=device).repeat(q_steps * num_thoughts)  # (Sq*N,) t of each query
    text_part = torch.arange(seq_len, device=device)[None, :] <= q_text_pos[:, None]  # (Sq*N, T)
    text_part = text_part[None] & text_key_mask[:, None, :].bool()  # (B, Sq*N, T)
    q_branch = torch.arange(branches, device=device).repeat(q_steps)  # (Sq*N,)
    q_step = torch.arange(k_steps - q_steps, k_steps, device=device).repeat_interleave(branches)
    k_branch = torch.arange(branches, device=device).repeat(k_steps)  # (Sk*N,)
    k_step = torch.arange(k_steps, device=device).repeat_interleave(branches)
    branch_part = (q_branch[:, None] == k_branch[None, :]) & (k_step[None, :] <= q_step[:, None])
    return torch.cat([text_part, branch_part[None].expand(text_part.shape[0], -1, -1)], dim=-1)


def branch_attention_dense(
    q: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    k_branch: torch.Tensor,
    v_branch: torch.Tensor,
    text_key_mask: torch.Tensor,
    num_thoughts: int,
    scale: float,
) -> torch.Tensor:
    """Reference: plain softmax attention over all keys with the dense mask. Same signature and result."""
    heads, kv_heads = q.shape[1], k_text.shape[1]
    branches = num_thoughts * k_text.shape[2]
    mask = dense_branch_mask(text_key_mask, num_thoughts, q.shape[2] // branches, k_branch.shape[2] // branches)
    keys = torch.cat([k_text, k_branch], dim=2).repeat_interleave(heads // kv_heads, dim=1)  # (B, H, T+Sk*N, d)
    values = torch.cat([v_text, v_branch], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale  # (B, H, Sq*N, T+Sk*N)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype) @ values
