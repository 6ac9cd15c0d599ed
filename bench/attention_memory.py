"""Benchmark of branch attention: peak memory and time of `score` forward + backward as the window T grows.

    python bench/attention_memory.py            # T in {256, 1024}; ~2 min (one thread per run); writes
                                                # bench/results/attention_memory.json
    python bench/attention_memory.py --quick    # T in {32, 64}, a smoke test

Model: a tiny random Llama (hidden 64, 2 layers, 4 heads / 2 KV heads, intermediate 256, vocab 1000), B=1,
R=2, M=9, K=4 (L = M+K+1 = 14 branch steps: the authors' n_ahead 12 plus <sot> and <eot>). Three paths:

- flash: the default `branch_attention` (online softmax over chunks, recomputing backward);
- old:   the previous default, kept below as `old_branch_attention`: text scores (Sq*R*T, T) per head,
         kept by autograd, so memory grows with T^2;
- dense: `thought.attention: dense`, the oracle with the full (Sq*N, T + Sk*N) mask (T=256 only: at
         T=1024 one layer's scores alone would be 13.6 GB).

Each point runs twice, each time in a fresh subprocess with one thread. Memory run: one step; its peak is
the peak resident set size during the step minus the resident set size just before it (model built,
gradients allocated), with glibc told to return freed blocks to the OS at once so the peak follows live
tensors. Time run: the default allocator (returning every block costs page faults that are no part of the
algorithm), one warm-up step, then the best of a few.
The issue's reference: the authors' code takes 13.7 s and 2,642 MB at T=1024, n_ahead 12; we cannot run it
here, so their numbers are quoted, not measured.
"""

import argparse
import json
import resource
import time

import torch
import transformers
from common import RESULTS, print_table, reset_peak, rss_kib, run_point, write_results

import qstar_rl.model as model_module
from qstar_rl.config import ThoughtConfig
from qstar_rl.loading import tiny_lm
from qstar_rl.model import ThinkingLM

AUTHORS = {"T": 1024, "fwd_bwd_s": 13.7, "peak_mib": 2642.0}
"""The issue's figure for the authors' Quiet-STaR code at T=1024, n_ahead 12."""
TARGETS = {"memory_growth_max": 4.5, "speedup_vs_authors_min": 2.0, "memory_vs_authors_max": 0.3}


def old_branch_attention(
    q: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    k_branch: torch.Tensor,
    v_branch: torch.Tensor,
    text_key_mask: torch.Tensor,
    num_thoughts: int,
    scale: float,
) -> torch.Tensor:
    """The previous default path, verbatim: materialises (B, Hkv, G, Sq, R, T, T) text scores."""
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
    q_step = torch.arange(k_steps - q_steps, k_steps, device=q.device)
    branch_allowed = torch.arange(k_steps, device=q.device)[None, :] <= q_step[:, None]  # (Sq, Sk)
    scores_branch = scores_branch.masked_fill(~branch_allowed[:, None, :], float("-inf"))

    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    probs = torch.cat([scores_text, scores_branch], dim=-1).softmax(dim=-1, dtype=softmax_dtype).to(q.dtype)
    probs_text, probs_branch = probs.split([seq_len, k_steps], dim=-1)
    out = torch.einsum("bkgsnu,bkud->bkgsnd", probs_text, v_text)  # (B, Hkv, G, Sq, N, d)
    out = out + torch.einsum("bkgsnp,bkpnd->bkgsnd", probs_branch, vb)
    return out.reshape(batch, heads, num_q, head_dim)


def tiny_llama() -> transformers.PreTrainedModel:
    """The issue's tiny Llama: hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 256, vocabulary 1000."""
    return tiny_lm("llama", vocab_size=1000, hidden_size=64, num_heads=4, intermediate_size=256, max_positions=2048)


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM); False where that is not allowed."""
    try:
        reset_peak()
        return True
    except OSError:
        return False


def measure(spec: dict) -> dict:
    """One run inside a fresh subprocess: `repeats` score forward+backward steps after `warmup` ones; the peak
    memory of the measured steps and their best time."""
    torch.set_num_threads(1)
    calls = {"old": 0}
    if spec["path"] == "old":

        def counted_old(*args, **kwargs):
            calls["old"] += 1
            return old_branch_attention(*args, **kwargs)

        model_module.branch_attention = counted_old  # BranchAttention.attend looks it up at call time
    attention = "dense" if spec["path"] == "dense" else "efficient"
    thought = ThoughtConfig(spec["R"], spec["M"], spec["K"], init_token_id=5, attention=attention)
    model = ThinkingLM(tiny_llama(), thought)
    seq_len = spec["T"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (spec["B"], seq_len), generator=gen)
    thoughts = torch.randint(3, 1000, (spec["B"], spec["R"], seq_len, spec["M"]), generator=gen)
    for p in model.parameters():  # gradients allocated before measuring: they are not activation memory
        p.grad = torch.zeros_like(p)

    times = []

    def step() -> None:
        start = time.perf_counter()
        out = model.score(ids, thoughts)
        loss = -(out.talk_logprobs.sum() + out.policy_logprobs.sum() + out.base_logprobs.sum())
        loss.backward()
        times.append(time.perf_counter() - start)

    for _ in range(spec["warmup"]):
        step()
    times.clear()
    resettable = _reset_peak_rss()
    base_kib = rss_kib("VmRSS")
    for _ in range(spec["repeats"]):
        step()
    peak_kib = rss_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if spec["path"] == "old" and calls["old"] == 0:
        raise RuntimeError("the old path was never called: ThinkingLM no longer looks up model.branch_attention")
    return {**spec, "peak_mib": (peak_kib - base_kib) / 1024, "fwd_bwd_s": min(times), "all_s": times}


def run_spec(spec: dict, time_repeats: int) -> dict:
    """Peak memory from one step, time as the best of `time_repeats` steps after a warm-up, each in its own
    fresh subprocess."""
    print(f"  running {spec['path']:>5} T={spec['T']} ...", flush=True)
    one_thread = {"OMP_NUM_THREADS": "1"}
    memory = run_point(__file__, {**spec, "warmup": 0, "repeats": 1}, one_thread)
    timing = run_point(__file__, {**spec, "warmup": 1, "repeats": time_repeats}, one_thread, measuring=False)
    return {**spec, "peak_mib": memory["peak_mib"], "fwd_bwd_s": timing["fwd_bwd_s"], "all_s": timing["all_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T in {32, 64} (smoke test)")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "attention_memory.json"))
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(json.loads(args.point))))
        return

    small, large = (32, 64) if args.quick else (256, 1024)
    base = {"B": 1, "R": 2, "M": 9, "K": 4}
    grid = [{"path": path, "T": t} for path in ("flash", "old") for t in (small, large)] + [
        {"path": "dense", "T": small}
    ]
    rows = [run_spec({**base, **point}, time_repeats=3 if point["T"] == small else 2) for point in grid]
    by = {(r["path"], r["T"]): r for r in rows}
    print_table(
        "score forward+backward, tiny Llama (D=64, 2 layers, 4/2 heads), B=1, R=2, M=9, K=4, 1 thread",
        rows,
        ["path", "T", "peak_mib", "fwd_bwd_s"],
    )

    flash_small, flash_large, old_large = by["flash", small], by["flash", large], by["old", large]
    ratios = {
        "flash_memory_growth": flash_large["peak_mib"] / flash_small["peak_mib"],
        "old_memory_growth": old_large["peak_mib"] / by["old", small]["peak_mib"],
        "flash_time_growth": flash_large["fwd_bwd_s"] / flash_small["fwd_bwd_s"],
        "speedup_vs_old": old_large["fwd_bwd_s"] / flash_large["fwd_bwd_s"],
        "memory_vs_old": flash_large["peak_mib"] / old_large["peak_mib"],
        "speedup_vs_dense": by["dense", small]["fwd_bwd_s"] / flash_small["fwd_bwd_s"],
        "memory_vs_dense": flash_small["peak_mib"] / by["dense", small]["peak_mib"],
    }
    if not args.quick:  # the authors' figure is for T=1024
        ratios["speedup_vs_authors"] = AUTHORS["fwd_bwd_s"] / flash_large["fwd_bwd_s"]
        ratios["memory_vs_authors"] = flash_large["peak_mib"] / AUTHORS["peak_mib"]
    checks = {"memory_growth_ok": ratios["flash_memory_growth"] <= TARGETS["memory_growth_max"]}
    if not args.quick:
        checks["speedup_vs_authors_ok"] = ratios["speedup_vs_authors"] >= TARGETS["speedup_vs_authors_min"]
        checks["memory_vs_authors_ok"] = ratios["memory_vs_authors"] <= TARGETS["memory_vs_authors_max"]
    comparisons = [
        {"ratio": f"flash peak T={large} / T={small} (target <= 4.5)", "value": ratios["flash_memory_growth"]},
        {"ratio": f"old peak T={large} / T={small}", "value": ratios["old_memory_growth"]},
        {"ratio": f"old / flash time at T={large}", "value": ratios["speedup_vs_old"]},
        {"ratio": f"flash / old peak at T={large}", "value": ratios["memory_vs_old"]},
        {"ratio": f"dense / flash time at T={small}", "value": ratios["speedup_vs_dense"]},
        {"ratio": f"flash / dense peak at T={small}", "value": ratios["memory_vs_dense"]},
    ]
    if not args.quick:
        comparisons += [
            {"ratio": "authors 13.7 s / flash time at T=1024 (target >= 2)", "value": ratios["speedup_vs_authors"]},
            {"ratio": "flash peak / authors 2,642 MB (target <= 0.3)", "value": ratios["memory_vs_authors"]},
        ]
    print_table("ratios", comparisons, ["ratio", "value"])
    print("\nchecks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))

    write_results(
        args.out,
        threads=1,
        transformers=transformers.__version__,
        quick=args.quick,
        setup={**base, "model": "tiny llama D=64 L=2 H=4 Hkv=2 I=256 V=1000", "authors": AUTHORS},
        points=rows,
        ratios=ratios,
        targets=TARGETS,
        checks=checks,
    )


if __name__ == "__main__":
    main()
