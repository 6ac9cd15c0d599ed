"""Where a training step's time goes, and how close it runs to this machine's matrix-multiply limit.

    python bench/step_cost.py            # SmolLM2-135M at the default shape, T=256 and T=1024 (CPU: ~30 min)
    python bench/step_cost.py --quick    # tiny model, two small shapes (smoke test)

For each shape (the default config with only T, and at T=1024 activation checkpointing, changed) one fresh
subprocess builds the trainer's real ZeRO-3 engine, runs one warm-up step, then one step timed per phase:
- sample: `rollout.rollout` (one text pass + M decode steps over all B*R*T branches, no grad);
- forward: `ThinkingLM.score` through the engine plus the loss;
- backward: `engine.backward`;
- optimizer: `engine.step` (clipping + AdamW).
Then the same step again under a dispatch mode that counts FLOPs with torch.utils.flop_counter's formulas
(untimed), per phase (matrix products and attention; elementwise work is not counted). The GEMM limit is this machine's
`torch.mm` rate in the step's dtype on the model's own matrix shapes (the q/k/v/o projections, the MLP and
the LM head, weighted by the FLOPs each takes per token), measured in the same process and thread count, before
the warm-up step and after the last step, the higher of the two (on a shared VM it moved 48-66 GFLOP/s);
`frac_of_gemm_limit` = (FLOPs / GEMM rate) / measured time. Times come from a process with the allocator a run uses
(`model.cpu_allocator`: at T=1024, with activation checkpointing, jemalloc: the point restarts itself with it as the
trainer does), the fastest of `--repeats` timed steps. Peak RSS is the resident-set high-water mark of a measured
step above the level right before it (/proc/self/clear_refs), from a second process with bench/common.py's measuring
allocator (freed memory leaves at once: the peak of live tensors); `resident_mib` is the timing process's whole
resident set at its highest during the timed steps. On GPU: the allocator's peak. For the default shape a third
process runs with glibc's default allocator (MALLOC_TRIM_THRESHOLD_ set, so the trainer leaves it alone):
`freed_memory_reuse_speedup` is its step time over the run's, and `glibc_default_resident_mib` its resident set at
most.
ZeRO-3 against a plain torch AdamW at world size 1 comes from bench/zero3_tax.py (same model and data).

Writes bench/results/step_cost.json with top-level keys default_dtype, frac_of_gemm_limit (full step of the
default shape), zero3_over_plain_time and zero3_over_plain_peak_rss.
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import RESULTS, peak, print_table, reset_peak, run_point, use_the_trainers_cpu_allocator, write_results
from zero3_tax import QUICK as TAX_QUICK
from zero3_tax import STEP as TAX_STEP
from zero3_tax import compare_engines

from qstar_rl.config import load_config
from qstar_rl.data import WindowStream
from qstar_rl.engine import build_thinking_engine, init_distributed
from qstar_rl.flops import PhaseFlops
from qstar_rl.learner import thinking_loss
from qstar_rl.rollout import rollout

ROOT = Path(__file__).parents[1]
DEFAULT = ROOT / "qstar_rl" / "configs" / "default.yaml"
PHASES = ("sample", "forward", "backward", "optimizer")
SHAPES = {
    "default": [],
    "T=256": ["data.seq_len=256"],
    "T=1024": ["data.seq_len=1024", "model.gradient_checkpointing=true"],
}
GLIBC_DEFAULT_ENV = {"MALLOC_TRIM_THRESHOLD_": "131072"}
"""glibc's own default trim threshold, set explicitly: the trainer then leaves the allocator as glibc sets it up."""
QUICK_SHAPES = {"default": ["data.seq_len=32"], "T=64": ["data.seq_len=64", "model.gradient_checkpointing=true"]}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_step(model, engine, full_weights, batch: dict, config, version: int, mark: Callable[[str], None]) -> None:
    """One step of one micro-batch, as learner.train_step runs it, calling mark(phase) as each phase ends."""
    thoughts = rollout(model, batch, config.train.seed, version, full_weights())
    mark("sample")
    model.train()
    out = engine(thoughts.input_ids, thoughts.thought_ids, thoughts.attention_mask)
    loss, _, _ = thinking_loss(out, thoughts, config, version, num_valid=None)  # the learner's own loss
    mark("forward")
    engine.backward(loss.total)
    mark("backward")
    engine.step()
    mark("optimizer")


class PhaseClock:
    """mark(phase): seconds since the previous mark (device synchronised)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        _sync()
        now = time.perf_counter()
        self.values[phase], self.last = now - self.last, now


def gemm_rate(lm_config, dtype: torch.dtype, rows: int, device: torch.device, min_seconds: float = 0.2) -> float:
    """FLOP/s of torch.mm on this model's matrix shapes, rows x in @ in x out, weighted by their FLOPs per
    token (every layer's projections and MLP, plus the LM head once): the rate a step made only of these
    products would reach. Each shape's time is the fastest call over at least `min_seconds` of calls (a few
    calls alone swing by +-20% on a shared VM)."""
    d = lm_config.hidden_size
    head_dim = getattr(lm_config, "head_dim", None) or d // lm_config.num_attention_heads
    kv = getattr(lm_config, "num_key_value_heads", lm_config.num_attention_heads) * head_dim
    inter = getattr(lm_config, "intermediate_size", None) or 4 * d
    layers = lm_config.num_hidden_layers
    shapes = [(d, d, 2 * layers), (d, kv, 2 * layers), (d, inter, 2 * layers), (inter, d, layers)]  # (in, out, n)
    shapes.append((d, lm_config.vocab_size, 1))
    flops, seconds = 0.0, 0.0
    for fan_in, fan_out, count in shapes:
        a = torch.randn(rows, fan_in, device=device, dtype=dtype)
        b = torch.randn(fan_in, fan_out, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up
        _sync()
        best, spent = float("inf"), 0.0
        while spent < min_seconds:
            start = time.perf_counter()
            torch.mm(a, b)
            _sync()
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
        flops += 2.0 * rows * fan_in * fan_out * count
        seconds += best * count
    return flops / seconds


def step_point(spec: dict) -> dict:
    """Phase times, FLOPs, GEMM limit and peak memory of one step at one shape (in a fresh subprocess)."""
    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix="qbench") as tmp:
        config = load_config(DEFAULT, [*spec["overrides"], f"train.run_dir={tmp}", "train.steps=100"])
        use_the_trainers_cpu_allocator(config.model)
        _, world, local_rank = init_distributed()
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        model, tokenizer, engine, full_weights = build_thinking_engine(config, world)
        batches = WindowStream(config.data, tokenizer, seed=0).batches(config.train.micro_batch_size)

        def next_batch() -> dict:
            return {k: v.to(device) for k, v in next(batches).items()}

        dtype = next(p for p in engine.module.parameters() if p.is_floating_point()).dtype
        thought = config.thought
        tokens = config.train.micro_batch_size * config.data.seq_len
        branch_rows = tokens * thought.num_thoughts * (thought.length + thought.talk_length + 1)
        rates = [] if spec.get("peak_only") else [gemm_rate(model.lm.config, dtype, min(branch_rows, 4096), device)]
        run_step(model, engine, full_weights, next_batch(), config, 0, lambda phase: None)  # warm-up
        base = reset_peak()
        clocks = []
        for repeat in range(spec["repeats"]):
            clocks.append(PhaseClock())
            run_step(model, engine, full_weights, next_batch(), config, 1 + repeat, clocks[-1])
        high_water = peak()
        growth = high_water - base
        if spec.get("peak_only"):
            return {"peak_rss_mib": growth / 2**20}
        with PhaseFlops() as flops:
            run_step(model, engine, full_weights, next_batch(), config, 1 + spec["repeats"], flops)
        # the limit is the best the machine showed: measured before the warm-up step and after the last step
        rates = [*rates, gemm_rate(model.lm.config, dtype, min(branch_rows, 4096), device)]
        rate = max(rates)
    seconds, counted = min((c.values for c in clocks), key=lambda v: sum(v.values())), flops.values
    total_s, total_flops = sum(seconds.values()), sum(counted.values())
    phases = [
        {
            "phase": phase,
            "seconds": seconds[phase],
            "gflop": counted[phase] / 1e9,
            "gflop_per_s": counted[phase] / seconds[phase] / 1e9,
            "frac_of_gemm_limit": counted[phase] / rate / seconds[phase],
        }
        for phase in PHASES
    ]
    return {
        **spec,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "T": config.data.seq_len,
        "text_tokens": tokens,
        "branch_tokens": branch_rows,
        "phases": phases,
        "step_seconds": total_s,
        "step_gflop": total_flops / 1e9,
        "gemm_gflop_per_s": rate / 1e9,
        "gemm_gflop_per_s_measured": [r / 1e9 for r in rates],
        "frac_of_gemm_limit": total_flops / rate / total_s,
        "peak_rss_mib": growth / 2**20,
        "resident_mib": high_water / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, small shapes (smoke test)")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "step_cost.json"))
    parser.add_argument("--shapes", help="comma-separated subset of the shapes (default: all)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per step")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per shape (the fastest is reported)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted.key=value applied to every shape (e.g. model.dtype=float32)"
    )
    args = parser.parse_args()
    if args.point:
        print(json.dumps(step_point(json.loads(args.point))))
        return
    model = ["model.name=tiny-llama"] if args.quick else []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = {name: shapes[name] for name in args.shapes.split(",")}
    points = []
    for name, overrides in shapes.items():
        spec = {"shape": name, "threads": args.threads, "overrides": [*model, *overrides, *args.overrides]}
        timing = run_point(__file__, {**spec, "repeats": args.repeats}, measuring=False)
        memory = run_point(__file__, {**spec, "repeats": 1, "peak_only": True})
        points.append({**timing, "peak_rss_mib": memory["peak_rss_mib"]})
    default = points[0]
    glibc_spec = {"shape": default["shape"], "threads": args.threads, "overrides": default["overrides"]}
    glibc = run_point(__file__, {**glibc_spec, "repeats": args.repeats}, GLIBC_DEFAULT_ENV, measuring=False)
    reuse = {
        "glibc_default_step_seconds": glibc["step_seconds"],
        "glibc_default_resident_mib": glibc["resident_mib"],
        "freed_memory_reuse_speedup": glibc["step_seconds"] / default["step_seconds"],
    }
    for point in points:
        print_table(
            f"{point['shape']}: T={point['T']}, {point['dtype']}, {point['threads']} threads, "
            f"GEMM limit {point['gemm_gflop_per_s']:.0f} GFLOP/s, peak RSS {point['peak_rss_mib']:.0f} MiB live, "
            f"process resident {point['resident_mib']:.0f} MiB",
            [
                *point["phases"],
                {
                    "phase": "step",
                    "seconds": point["step_seconds"],
                    "gflop": point["step_gflop"],
                    "gflop_per_s": point["step_gflop"] / point["step_seconds"],
                    "frac_of_gemm_limit": point["frac_of_gemm_limit"],
                },
            ],
            ["phase", "seconds", "gflop", "gflop_per_s", "frac_of_gemm_limit"],
        )
    tax_overrides = [*TAX_STEP, *(TAX_QUICK if args.quick else [])]  # fp32: PlainEngine has no mixed precision
    comparison = compare_engines(tax_overrides, threads=args.threads, memory_run=not args.quick)
    tax = {key: comparison[key] for key in ("zero3_over_plain_time", "zero3_over_plain_peak_rss")}
    print(
        f"\nZeRO-3 / plain AdamW at world size 1 ({' '.join(tax_overrides)}): time "
        f"{tax['zero3_over_plain_time']:.2f}x, peak RSS {tax['zero3_over_plain_peak_rss']:.2f}x"
    )
    print(
        f"\n{default['shape']}: step {default['step_seconds']:.2f} s with freed memory kept for reuse, "
        f"{glibc['step_seconds']:.2f} s with glibc's default allocator: {reuse['freed_memory_reuse_speedup']:.2f}x; "
        f"process resident at most {default['resident_mib']:.0f} vs {glibc['resident_mib']:.0f} MiB"
    )
    write_results(
        args.out,
        command=" ".join(["python", "bench/step_cost.py", *sys.argv[1:]]),
        default_dtype=default["dtype"],
        frac_of_gemm_limit=default["frac_of_gemm_limit"],
        **tax,
        **reuse,
        points=points,
        zero3_vs_plain={"overrides": tax_overrides, **comparison},
    )


if __name__ == "__main__":
    main()
