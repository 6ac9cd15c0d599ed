"""Attention of branch tokens: causal over the T text keys, plus the keys of their own branch, one softmax.

Shapes: q (B, H, Sq*N, d) with N = R*T branches per sequence, laid out step-major (see layout.py); the
queries are the last Sq of Sk branch steps. Text keys/values (B, Hkv, T, d); branch keys/values
(B, Hkv, Sk*N, d). Grouped-query attention is handled by viewing the H query heads as (Hkv, G); K/V are
never repeated.

A branch query at text position t (any thought r, step s, head) sees the text keys u <= t that are real
tokens, and the steps 0..Sk-Sq+s of its own branch. Every one of the Sq*R*T queries has its own causal text
window, so written out plainly the text scores alone are (Sq*R*T, T): quadratic in the window T.

`branch_attention` (the default path) is computed FlashAttention-style and never holds anything of size
(T, T): the queries are taken in chunks of text positions and the text keys in chunks, each (query chunk,
key chunk) block is folded into a running (online) softmax, and key chunks that lie wholly in the future
of a query chunk are skipped, so the work is about half of T*T and the memory O(T * chunk). The own-branch
keys (Sq x Sk per branch, small) join the same softmax. Backward (`_FlashBranchAttention.backward`)
recomputes the probabilities block by block from q, k, v, the output and the per-query log-sum-exp, as
FlashAttention-2 does. Softmax statistics are fp32 (fp64 for fp64 inputs) whatever the input dtype.

`branch_attention_dense` builds the full (Sq*N, T + Sk*N) mask and is only the test oracle.
"""

from typing import NamedTuple

import torch

DEFAULT_CHUNK = 128
"""Text positions per query chunk and text keys per key chunk of `branch_attention`."""


def branch_attention(
    q: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    k_branch: torch.Tensor,
    v_branch: torch.Tensor,
    text_key_mask: torch.Tensor,
    num_thoughts: int,
    scale: float,
    query_chunk: int = DEFAULT_CHUNK,
    key_chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Returns (B, H, Sq*N, d) in q's dtype. text_key_mask (B, T) bool marks real text tokens.

    query_chunk: text positions whose queries are scored together (all G*Sq*R queries of each position);
    key_chunk: text keys per block. Memory of one block is B*H*Sq*R * query_chunk * key_chunk scores.
    """
    if query_chunk < 1 or key_chunk < 1:
        raise ValueError(f"chunk sizes must be >= 1, got query_chunk={query_chunk}, key_chunk={key_chunk}")
    return _FlashBranchAttention.apply(
        q, k_text, v_text, k_branch, v_branch, text_key_mask.bool(), num_thoughts, scale, query_chunk, key_chunk
    )


class _Dims(NamedTuple):
    """The letters of one call."""

    batch: int  # B
    kv_heads: int  # Hkv
    groups: int  # G = H / Hkv
    q_steps: int  # Sq
    k_steps: int  # Sk
    num_thoughts: int  # R
    seq_len: int  # T
    head_dim: int  # d

    @classmethod
    def of(cls, q: torch.Tensor, k_text: torch.Tensor, k_branch: torch.Tensor, num_thoughts: int) -> "_Dims":
        batch, heads, num_q, head_dim = q.shape
        kv_heads, seq_len = k_text.shape[1], k_text.shape[2]
        branches = num_thoughts * seq_len  # N
        return cls(
            batch,
            kv_heads,
            heads // kv_heads,
            num_q // branches,
            k_branch.shape[2] // branches,
            num_thoughts,
            seq_len,
            head_dim,
        )

    @property
    def rows(self) -> int:
        """P = G*Sq*R: the queries of one text position (they all share its causal text mask)."""
        return self.groups * self.q_steps * self.num_thoughts


# ---- layouts -------------------------------------------------------------------------------------
# The kernel works in a position-major "rows" layout (B, Hkv, T, P, d): the P queries of a text position
# side by side, so a chunk of positions is one contiguous slab and its text scores are one batched matmul.


def _to_rows(x: torch.Tensor, dims: _Dims) -> torch.Tensor:
    """(B, H, Sq*N, d) -> (B, Hkv, T, P, d), a copy."""
    b, hkv, g, sq, _, r, t, d = dims
    x = x.reshape(b, hkv, g, sq, r, t, d).permute(0, 1, 5, 2, 3, 4, 6)  # (B, Hkv, T, G, Sq, R, d)
    return x.reshape(b, hkv, t, dims.rows, d)


def _from_rows(x: torch.Tensor, dims: _Dims) -> torch.Tensor:
    """(B, Hkv, T, P, d) -> (B, H, Sq*N, d), a copy."""
    b, hkv, g, sq, _, r, t, d = dims
    x = x.view(b, hkv, t, g, sq, r, d).permute(0, 1, 3, 4, 5, 2, 6)  # (B, Hkv, G, Sq, R, T, d)
    return x.reshape(b, hkv * g, sq * r * t, d)


def _branch_to_positions(x: torch.Tensor, dims: _Dims) -> torch.Tensor:
    """Branch keys/values (B, Hkv, Sk*N, d) -> (B, Hkv, T, R, Sk, d), a copy: position-major like the rows."""
    b, hkv, _, _, sk, r, t, d = dims
    return x.reshape(b, hkv, sk, r, t, d).permute(0, 1, 4, 3, 2, 5).contiguous()


def _branch_from_positions(x: torch.Tensor, dims: _Dims) -> torch.Tensor:
    """(B, Hkv, T, R, Sk, d) -> (B, Hkv, Sk*N, d), a copy."""
    b, hkv, _, _, sk, r, t, d = dims
    return x.permute(0, 1, 4, 3, 2, 5).reshape(b, hkv, sk * r * t, d)


def _spans(length: int, size: int, stop: int | None = None) -> list[tuple[int, int]]:
    """[start, end) chunks of `size` covering 0..stop (default: length), the last one clipped to length."""
    return [(start, min(start + size, length)) for start in range(0, length if stop is None else stop, size)]


# ---- scores of one block -------------------------------------------------------------------------
# einsum letters: b = B, k = Hkv, t = a text position of the chunk, g = G, s = Sq, r = R, j = Sk, d = d.


def _text_allowed(text_key_mask: torch.Tensor, queries: tuple[int, int], keys: tuple[int, int]) -> torch.Tensor:
    """(B, Cq, Ck) bool: query position t sees text key u when u <= t and u is a real token."""
    device = text_key_mask.device
    t = torch.arange(*queries, device=device)[:, None]
    u = torch.arange(*keys, device=device)[None, :]
    return (u <= t)[None] & text_key_mask[:, None, keys[0] : keys[1]]


def _text_scores(
    q_blk: torch.Tensor, k_blk: torch.Tensor, allowed: torch.Tensor, scale: float, stat_dtype: torch.dtype
) -> torch.Tensor:
    """q_blk (B, Hkv, Cq, P, d), k_blk (B, Hkv, Ck, d), allowed (B, Cq, Ck) -> masked scores (B, Hkv, Cq, P, Ck)."""
    b, hkv, cq, p, d = q_blk.shape
    scores = q_blk.reshape(b, hkv, cq * p, d) @ k_blk.transpose(-1, -2)  # (B, Hkv, Cq*P, Ck), input dtype
    scores = scores.to(stat_dtype).view(b, hkv, cq, p, -1)
    # in place from here on: these blocks are the largest tensors of the kernel, a fresh one per op would
    # cost an allocation and a pass over memory each
    return scores.mul_(scale).masked_fill_(~allowed[:, None, :, None, :], float("-inf"))


def _step_allowed(dims: _Dims, device: torch.device) -> torch.Tensor:
    """(Sq, Sk) bool: query step s (the last Sq of Sk steps) sees its own branch's steps 0..Sk-Sq+s."""
    q_step = torch.arange(dims.k_steps - dims.q_steps, dims.k_steps, device=device)
    return torch.arange(dims.k_steps, device=device)[None, :] <= q_step[:, None]


def _branch_scores(
    q_blk: torch.Tensor, kb_blk: torch.Tensor, step_allowed: torch.Tensor, scale: float, stat_dtype: torch.dtype
) -> torch.Tensor:
    """q_blk (B, Hkv, Cq, G, Sq, R, d), kb_blk (B, Hkv, Cq, R, Sk, d) -> masked own-branch scores
    (B, Hkv, Cq, G, Sq, R, Sk)."""
    scores = torch.einsum("bktgsrd,bktrjd->bktgsrj", q_blk, kb_blk).to(stat_dtype) * scale
    return scores.masked_fill(~step_allowed[:, None, :], float("-inf"))  # (Sq, 1, Sk) against (.., Sq, R, Sk)


# ---- the autograd function -----------------------------------------------------------------------


class _FlashBranchAttention(torch.autograd.Function):
    """Online-softmax branch attention whose backward recomputes the probabilities block by block.

    Saved for backward: the queries, keys and values (in the kernel's layouts), the output and the fp32
    log-sum-exp of every query row: all linear in T.
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k_text: torch.Tensor,
        v_text: torch.Tensor,
        k_branch: torch.Tensor,
        v_branch: torch.Tensor,
        text_key_mask: torch.Tensor,
        num_thoughts: int,
        scale: float,
        query_chunk: int,
        key_chunk: int,
    ) -> torch.Tensor:
        dims = _Dims.of(q, k_text, k_branch, num_thoughts)
        b, hkv, g, sq, _, r, t, d = dims
        stat_dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 scores are normalised in fp32
        q_rows = _to_rows(q, dims)  # (B, Hkv, T, P, d)
        k_pos = _branch_to_positions(k_branch, dims)  # (B, Hkv, T, R, Sk, d)
        v_pos = _branch_to_positions(v_branch, dims)
        step_allowed = _step_allowed(dims, q.device)
        out_rows = torch.empty_like(q_rows)
        lse = torch.empty(b, hkv, t, dims.rows, dtype=stat_dtype, device=q.device)  # (B, Hkv, T, P)

        for t0, t1 in _spans(t, query_chunk):
            q_blk = q_rows[:, :, t0:t1]  # (B, Hkv, Cq, P, d)
            cq = t1 - t0
            # Start the running softmax with the own branch: its <sot> (step 0) is visible to every query, so
            # the running max is finite from here on and text chunks with no visible key at all (padding, or
            # a query at a padded position) add exp(-inf) = 0 instead of NaN.
            scores = _branch_scores(
                q_blk.view(b, hkv, cq, g, sq, r, d), k_pos[:, :, t0:t1], step_allowed, scale, stat_dtype
            )
            run_max = scores.amax(dim=-1)  # (B, Hkv, Cq, G, Sq, R)
            probs = torch.exp(scores - run_max[..., None])
            run_sum = probs.sum(dim=-1)
            acc = torch.einsum("bktgsrj,bktrjd->bktgsrd", probs.to(q.dtype), v_pos[:, :, t0:t1]).to(stat_dtype)
            run_max, run_sum = run_max.reshape(b, hkv, cq, -1), run_sum.reshape(b, hkv, cq, -1)  # (B, Hkv, Cq, P)
            acc = acc.reshape(b, hkv, cq, dims.rows, d)  # (B, Hkv, Cq, P, d)

            for u0, u1 in _spans(t, key_chunk, stop=t1):  # keys at or after t1 are in every query's future
                allowed = _text_allowed(text_key_mask, (t0, t1), (u0, u1))
                scores = _text_scores(q_blk, k_text[:, :, u0:u1], allowed, scale, stat_dtype)  # (B, Hkv, Cq, P, Ck)
                new_max = torch.maximum(run_max, scores.amax(dim=-1))
                rescale = torch.exp(run_max - new_max)  # earlier blocks were exponentiated against the old max
                probs = scores.sub_(new_max[..., None]).exp_()
                run_sum = run_sum * rescale + probs.sum(dim=-1)
                pv = probs.to(q.dtype).view(b, hkv, cq * dims.rows, -1) @ v_text[:, :, u0:u1]  # (B, Hkv, Cq*P, d)
                acc = acc * rescale[..., None] + pv.view(acc.shape)
                run_max = new_max

            out_rows[:, :, t0:t1] = (acc / run_sum[..., None]).to(q.dtype)
            lse[:, :, t0:t1] = run_max + run_sum.log()

        ctx.save_for_backward(q_rows, k_text, v_text, k_pos, v_pos, text_key_mask, out_rows, lse)
        ctx.dims, ctx.scale, ctx.query_chunk, ctx.key_chunk = dims, scale, query_chunk, key_chunk
        return _from_rows(out_rows, dims)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        """FlashAttention-2 backward. With P = exp(S - lse) recomputed per block and dP = dO V^T,
        dS = P * (dP - rowsum(dO * O)); then dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO."""
        q_rows, k_text, v_text, k_pos, v_pos, text_key_mask, out_rows, lse = ctx.saved_tensors
        dims, scale = ctx.dims, ctx.scale
        b, hkv, g, sq, _, r, t, d = dims
        dtype, stat_dtype = q_rows.dtype, lse.dtype
        step_allowed = _step_allowed(dims, q_rows.device)
        grad_rows = _to_rows(grad_out, dims)  # dO (B, Hkv, T, P, d)
        # rowsum(dO * O) = sum_j P_j dP_j: the softmax Jacobian's correction term, one number per query row
        delta = (grad_rows.to(stat_dtype) * out_rows.to(stat_dtype)).sum(dim=-1)  # (B, Hkv, T, P)
        grad_q = torch.zeros_like(q_rows, dtype=stat_dtype)
        grad_k_text = torch.zeros_like(k_text, dtype=stat_dtype)
        grad_v_text = torch.zeros_like(v_text, dtype=stat_dtype)
        grad_k_pos = torch.empty_like(k_pos, dtype=stat_dtype)  # every position is written by its query chunk
        grad_v_pos = torch.empty_like(v_pos, dtype=stat_dtype)

        for t0, t1 in _spans(t, ctx.query_chunk):
            cq = t1 - t0
            q_blk, do_blk = q_rows[:, :, t0:t1], grad_rows[:, :, t0:t1]  # (B, Hkv, Cq, P, d)
            lse_blk, delta_blk = lse[:, :, t0:t1, :, None], delta[:, :, t0:t1, :, None]  # (B, Hkv, Cq, P, 1)

            # own branch, in (B, Hkv, Cq, G, Sq, R, Sk)
            branch_shape = (b, hkv, cq, g, sq, r)
            q_7d, do_7d = q_blk.view(*branch_shape, d), do_blk.view(*branch_shape, d)
            scores = _branch_scores(q_7d, k_pos[:, :, t0:t1], step_allowed, scale, stat_dtype)
            probs = torch.exp(scores - lse_blk.view(*branch_shape, 1))
            grad_probs = torch.einsum("bktgsrd,bktrjd->bktgsrj", do_7d, v_pos[:, :, t0:t1]).to(stat_dtype)
            grad_scores = (probs * (grad_probs - delta_blk.view(*branch_shape, 1))).to(dtype)
            probs = probs.to(dtype)
            grad_q_blk = torch.einsum("bktgsrj,bktrjd->bktgsrd", grad_scores, k_pos[:, :, t0:t1]).to(stat_dtype)
            grad_q_blk = grad_q_blk.reshape(b, hkv, cq, dims.rows, d) * scale
            grad_k_pos[:, :, t0:t1] = torch.einsum("bktgsrj,bktgsrd->bktrjd", grad_scores, q_7d) * scale
            grad_v_pos[:, :, t0:t1] = torch.einsum("bktgsrj,bktgsrd->bktrjd", probs, do_7d)

            # text, block by block as in forward; (B, Hkv, Cq*P, .) views make each product one batched matmul
            q_mat, do_mat = q_blk.reshape(b, hkv, cq * dims.rows, d), do_blk.reshape(b, hkv, cq * dims.rows, d)
            for u0, u1 in _spans(t, ctx.key_chunk, stop=t1):
                allowed = _text_allowed(text_key_mask, (t0, t1), (u0, u1))
                scores = _text_scores(q_blk, k_text[:, :, u0:u1], allowed, scale, stat_dtype)  # (B, Hkv, Cq, P, Ck)
                probs = scores.sub_(lse_blk).exp_()
                grad_probs = (do_mat @ v_text[:, :, u0:u1].transpose(-1, -2)).to(stat_dtype).view(probs.shape)
                grad_scores = grad_probs.sub_(delta_blk).mul_(probs).to(dtype).view(b, hkv, cq * dims.rows, -1)
                probs = probs.to(dtype).view(grad_scores.shape)  # (B, Hkv, Cq*P, Ck)
                grad_q_blk += (grad_scores @ k_text[:, :, u0:u1]).view(grad_q_blk.shape) * scale
                grad_k_text[:, :, u0:u1] += (grad_scores.transpose(-1, -2) @ q_mat) * scale
                grad_v_text[:, :, u0:u1] += probs.transpose(-1, -2) @ do_mat
            grad_q[:, :, t0:t1] = grad_q_blk

        return (
            _from_rows(grad_q.to(dtype), dims),
            grad_k_text.to(dtype),
            grad_v_text.to(dtype),
            _branch_from_positions(grad_k_pos.to(dtype), dims),
            _branch_from_positions(grad_v_pos.to(dtype), dims),
            None,
            None,
            None,
            None,
            None,
        )


# ---- the dense oracle ----------------------------------------------------------------------------


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
