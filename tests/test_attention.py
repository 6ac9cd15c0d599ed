"""The flash-style `branch_attention` against the dense oracle: values and gradients of all five inputs, and
memory that grows linearly in the window T (what it saves for backward and the largest tensor it creates)."""

from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qstar_rl.core.attention import branch_attention, branch_attention_dense


class Case(NamedTuple):
    """One call's sizes (letters as in core/attention.py)."""

    batch: int = 2  # B
    heads: int = 6  # H
    kv_heads: int = 2  # Hkv
    seq_len: int = 37  # T
    num_thoughts: int = 3  # R
    q_steps: int = 5  # Sq
    k_steps: int = 5  # Sk
    head_dim: int = 20  # d


def make_inputs(case: Case, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Random q, k_text, v_text, k_branch, v_branch (requiring grad) and a text mask with padding: row 0 is
    right-padded, row 1 has padded positions at the start (queries there see no text key at all) and inside."""
    gen = torch.Generator().manual_seed(seed)
    branches = case.num_thoughts * case.seq_len  # N

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()

    q = rand(case.batch, case.heads, case.q_steps * branches, case.head_dim)
    k_text = rand(case.batch, case.kv_heads, case.seq_len, case.head_dim)
    v_text = rand(case.batch, case.kv_heads, case.seq_len, case.head_dim)
    k_branch = rand(case.batch, case.kv_heads, case.k_steps * branches, case.head_dim)
    v_branch = rand(case.batch, case.kv_heads, case.k_steps * branches, case.head_dim)
    mask = torch.ones(case.batch, case.seq_len, dtype=torch.bool)
    mask[0, case.seq_len - case.seq_len // 4 :] = False
    if case.batch > 1:
        mask[1, :3] = False
        mask[1, case.seq_len // 2 : case.seq_len // 2 + 2] = False
    return (q, k_text, v_text, k_branch, v_branch), mask.to(device)


def values_and_grads(fn, inputs, mask, num_thoughts: int, upstream: torch.Tensor | None = None, **chunks):
    """fn's output and the gradients of all five inputs under a fixed random upstream gradient."""
    out = fn(*inputs, mask, num_thoughts, 0.37, **chunks)
    if upstream is None:
        gen = torch.Generator().manual_seed(1)
        upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, inputs, upstream)
    return out, grads, upstream


NAMES = ("out", "dq", "dk_text", "dv_text", "dk_branch", "dv_branch")


def assert_matches_dense(
    case: Case, dtype: torch.dtype, atol: float, rtol: float = 0.0, device: str = "cpu", **chunks
) -> None:
    inputs, mask = make_inputs(case, dtype, device)
    out, grads, upstream = values_and_grads(branch_attention, inputs, mask, case.num_thoughts, **chunks)
    ref, ref_grads, _ = values_and_grads(branch_attention_dense, inputs, mask, case.num_thoughts, upstream)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for name, got, want in zip(NAMES, (out, *grads), (ref, *ref_grads), strict=True):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


CHUNKS = {
    "smaller-not-dividing": {"query_chunk": 8, "key_chunk": 5},
    "mixed": {"query_chunk": 16, "key_chunk": 24},
    "single-position": {"query_chunk": 1, "key_chunk": 36},
    "larger-than-T": {"query_chunk": 64, "key_chunk": 128},
    "default": {},
}


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)], ids=["gqa", "mha"])
def test_fp32_values_and_grads_match_dense(heads, kv_heads, chunks):
    assert_matches_dense(Case(heads=heads, kv_heads=kv_heads), torch.float32, atol=1e-5, rtol=1e-5, **chunks)


@pytest.mark.parametrize("q_steps,k_steps", [(1, 5), (1, 1), (2, 7)], ids=["decode", "first-step", "two-of-seven"])
def test_fewer_query_steps_than_key_steps(q_steps, k_steps):
    """Decoding: Sq=1 new step against Sk keys of earlier steps (here with gradients too)."""
    case = Case(q_steps=q_steps, k_steps=k_steps)
    assert_matches_dense(case, torch.float32, atol=1e-5, rtol=1e-5, query_chunk=10, key_chunk=7)


def test_fp64_is_exact():
    """Statistics follow the input's precision up from fp32: fp64 in, fp64 softmax."""
    assert_matches_dense(Case(seq_len=19, head_dim=8), torch.float64, atol=1e-12, query_chunk=6, key_chunk=4)


def test_bf16_close_to_dense_and_as_accurate():
    """bf16 in and out, statistics in fp32: about as far from the fp64 truth as the dense bf16 path."""
    case = Case(seq_len=29, num_thoughts=2)
    inputs, mask = make_inputs(case, torch.bfloat16)
    chunks = {"query_chunk": 8, "key_chunk": 12}
    out, grads, upstream = values_and_grads(branch_attention, inputs, mask, case.num_thoughts, **chunks)
    dense, dense_grads, _ = values_and_grads(branch_attention_dense, inputs, mask, case.num_thoughts, upstream)
    exact_inputs = tuple(x.detach().double().requires_grad_() for x in inputs)
    truth, truth_grads, _ = values_and_grads(
        branch_attention_dense, exact_inputs, mask, case.num_thoughts, upstream.double()
    )
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    for name, got, ref, exact in zip(NAMES, (out, *grads), (dense, *dense_grads), (truth, *truth_grads), strict=True):
        torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05, msg=lambda m, name=name: f"{name}: {m}")
        error, dense_error = (got.double() - exact).abs().max(), (ref.double() - exact).abs().max()
        assert error <= 1.5 * dense_error + 1e-3, f"{name}: error {error:.4f} vs dense bf16 {dense_error:.4f}"


def test_without_grad_and_padding_rows_are_finite():
    """Under no_grad (the decode path), including queries at padded positions that see no text key."""
    case = Case(q_steps=1, k_steps=3)
    inputs, mask = make_inputs(case, torch.float32)
    mask[0] = False  # a whole row of padding: only the own branch is visible
    with torch.no_grad():
        out = branch_attention(*inputs, mask, case.num_thoughts, 0.37, query_chunk=9, key_chunk=4)
        ref = branch_attention_dense(*inputs, mask, case.num_thoughts, 0.37)
    assert not out.requires_grad and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_cuda_matches_dense(dtype, atol):
    assert_matches_dense(Case(), dtype, atol=atol, rtol=atol, device="cuda", query_chunk=16, key_chunk=24)


def test_rejects_empty_chunks():
    inputs, mask = make_inputs(Case(batch=1, seq_len=4), torch.float32)
    with pytest.raises(ValueError, match="chunk"):
        branch_attention(*inputs, mask, 3, 0.37, key_chunk=0)


# ---- memory --------------------------------------------------------------------------------------

MEMORY_CASE = Case(batch=1, heads=2, kv_heads=1, num_thoughts=2, q_steps=2, k_steps=2, head_dim=8)


def saved_bytes(fn, seq_len: int) -> int:
    """Bytes of every tensor autograd keeps for the backward of one call (a tensor saved twice counts twice)."""
    inputs, mask = make_inputs(MEMORY_CASE._replace(seq_len=seq_len), torch.float32)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs, mask, MEMORY_CASE.num_thoughts, 0.37)
    return total


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest_tensor(seq_len: int) -> int:
    """Largest tensor created in forward + backward of `branch_attention` (default chunks of 128)."""
    inputs, mask = make_inputs(MEMORY_CASE._replace(seq_len=seq_len), torch.float32)
    with LargestTensor() as mode:
        out = branch_attention(*inputs, mask, MEMORY_CASE.num_thoughts, 0.37)
        out.sum().backward()
    return mode.numel


def test_saved_for_backward_is_linear_in_window():
    new_256, new_512 = saved_bytes(branch_attention, 256), saved_bytes(branch_attention, 512)
    dense_512 = saved_bytes(branch_attention_dense, 512)
    # the text scores alone: H * (Sq*R*T queries) * T keys * 4 bytes = 8 MiB at T=512
    text_scores = MEMORY_CASE.heads * MEMORY_CASE.q_steps * MEMORY_CASE.num_thoughts * 512 * 512 * 4
    assert new_512 / new_256 <= 2.2, (new_256, new_512)
    assert new_512 < text_scores / 10, (new_512, text_scores)
    assert new_512 < dense_512 / 50, (new_512, dense_512)


def test_no_tensor_grows_quadratically():
    """Forward and backward never create a (T, T)-sized block: the largest tensor at least doubles with T
    only as linear ones do, while text scores would quadruple."""
    small, large = largest_tensor(256), largest_tensor(512)
    assert large / small <= 2.2, (small, large)
    text_scores_512 = MEMORY_CASE.heads * MEMORY_CASE.q_steps * MEMORY_CASE.num_thoughts * 512 * 512
    assert large < text_scores_512 / 8, (large, text_scores_512)
