"""The ZeRO-3 tax at one rank: a full training step under DeepSpeed ZeRO-3 against the same step with a plain
torch AdamW (`qstar_rl.engine.PlainEngine`), same model, same data, same thoughts.

    python bench/zero3_tax.py            # SmolLM2-135M fp32, T=64, R=2, M=5, K=4, B=1 (CPU: ~10 min on 2 cores),
                                         # writes bench/results/zero3_tax.json
    python bench/zero3_tax.py --quick    # tiny model, one subprocess for both engines (smoke test)

Engines (`KINDS`): `zero3` is the trainer's engine (`engine.build_thinking_engine`, so at one rank with
`engine.ONE_RANK_ZERO3` and `engine.drop_one_rank_zero3_overheads`); `plain` is PlainEngine over the same model.

A step is the trainer's own `learner.train_step` (rollout with the gathered weights, score with gradients,
losses, backward, optimizer step), built from qstar_rl/configs/default.yaml with the sizes above and
`model.dtype=float32` (PlainEngine has no mixed precision), at world size 1.

Times: both engines live in one fresh process with the allocator settings a run uses
(`model.cpu_allocator`) and take turns step by step, the order alternating (A B, B A, ...), on
the same windows and thoughts, so that the machine's drift over minutes (on a shared 2-core VM, +-15% between
runs minutes apart) falls on both alike. `zero3_over_plain_time` is the median of the per-step ratios after
the first two steps (warm-up: Adam moments, allocator growth); `step_s` each engine's median step, `worst_s` its
slowest step after the first, `cpu_s` its median CPU seconds (all the process's threads).
Peaks: each engine alone in a fresh process where glibc returns freed blocks at once, the resident-set
high-water mark over the step after the warm-up (reset through /proc/self/clear_refs), or on GPU
torch.cuda.max_memory_allocated. Absolute: weights, gradients and optimizer state count, since they are what
the tax is about.

`measure_engines(kinds, overrides)` measures in the calling process; `compare_engines(overrides)` does the
whole comparison in fresh subprocesses (what a comparison should use).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import (
    RESULTS,
    median_interval,
    peak,
    print_table,
    reset_peak,
    run_point,
    use_the_trainers_cpu_allocator,
    write_results,
)

from qstar_rl.config import Config, load_config
from qstar_rl.data import WindowStream
from qstar_rl.engine import (
    PlainEngine,
    all_reduce_sum,
    build_thinking_engine,
    init_distributed,
    resolve_dtype,
)
from qstar_rl.learner import train_step
from qstar_rl.loading import load_lm
from qstar_rl.model import ThinkingLM, enable_activation_checkpointing

ROOT = Path(__file__).parents[1]
DEFAULT = ROOT / "qstar_rl" / "configs" / "default.yaml"
KINDS = ("zero3", "plain")
STEP = ["data.seq_len=64", "thought.num_thoughts=2", "thought.length=5", "thought.talk_length=4", "model.dtype=float32"]
"""The step the issue measured: SmolLM2-135M (the default config's model), fp32, T=64, R=2, M=5, K=4, B=1."""
QUICK = ["model.name=tiny-llama", "data.seq_len=24"]
WARMUP_STEPS = 2


def build(kind: str, config: Config):
    """(model, tokenizer, engine, full_weights, world) for one of KINDS."""
    use_the_trainers_cpu_allocator(config.model)
    if kind == "zero3":
        _, world, _ = init_distributed()
        model, tokenizer, engine, full_weights = build_thinking_engine(config, world)
        return model, tokenizer, engine, full_weights, world
    lm, tokenizer = load_lm(config.model.name, seed=config.train.seed)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    model = ThinkingLM(lm, config.thought, tokenizer=tokenizer).to(_device())
    return model, tokenizer, PlainEngine(model, config), None, 1


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _step_record(seconds: float, cpu_seconds: float, result) -> dict:
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "loss": result.metrics["loss/total"],
        "rollout": result.metrics["time/rollout"],
        "learn": result.metrics["time/learn"],
    }


def _summary(kind: str, dtype: str, records: list[dict]) -> dict:
    timed = records[WARMUP_STEPS:]
    return {
        "engine": kind,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "step_s": statistics.median(r["seconds"] for r in timed),
        "worst_s": max(r["seconds"] for r in records[1:]),
        # CPU seconds of all the process's threads: less sensitive than wall time to other processes sharing the
        # cores (on a GPU it misses the device time; read step_s there)
        "cpu_s": statistics.median(r["cpu_seconds"] for r in timed),
        "rollout_s": statistics.median(r["rollout"] for r in timed),
        "learn_s": statistics.median(r["learn"] for r in timed),
        "loss_step1": records[0]["loss"],
        "step_times": [r["seconds"] for r in records],
        "cpu_times": [r["cpu_seconds"] for r in records],
        "losses": [r["loss"] for r in records],
    }


def measure_engines(
    kinds: Sequence[str], overrides: Sequence[str] = (), steps: int = 5, threads: int | None = None
) -> dict:
    """Time `steps` full training steps of each engine in `kinds` (KINDS) in this process, on the default config
    plus `overrides`, the engines taking turns step by step (the order alternating: A B, B A, ...) so that the
    machine's drift over minutes falls on both alike. With one engine, also its peak: the process's, so run it
    in a fresh process (see `run_engine`); DeepSpeed's process group stays for the rest of the process.
    Returns {"rows": [one summary per engine], "paired_ratios": [first / second engine's time, per step]}."""
    if not kinds or any(kind not in KINDS for kind in kinds):
        raise ValueError(f"kinds must be among {KINDS}, got {kinds!r}")
    if steps <= WARMUP_STEPS:
        raise ValueError(f"steps must exceed the {WARMUP_STEPS} warm-up steps, got {steps}")
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = _device()
    with tempfile.TemporaryDirectory(prefix="qbench") as tmp:
        config = load_config(DEFAULT, [*overrides, f"train.steps={steps}", f"train.run_dir={tmp}"])
        engines = {}
        for kind in kinds:
            torch.manual_seed(config.train.seed)  # the same mixing-head initialisation for every engine
            model, tokenizer, engine, full_weights, world = build(kind, config)
            batches = WindowStream(config.data, tokenizer, seed=config.train.seed).batches(
                config.train.micro_batch_size
            )
            engines[kind] = (model, engine, full_weights, world, batches)
        records: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for step in range(steps):
            if step == WARMUP_STEPS:  # the peak of the measured steps only
                reset_peak()
            for kind in kinds if step % 2 == 0 else reversed(kinds):
                model, engine, full_weights, world, batches = engines[kind]
                batch = {k: v.to(device) for k, v in next(batches).items()}
                start, cpu_start = time.perf_counter(), time.process_time()
                result = train_step(engine, model, [batch], config, step, all_reduce_sum, world, full_weights)
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                records[kind].append(_step_record(seconds, time.process_time() - cpu_start, result))
        peak_bytes = peak()  # absolute: weights, gradients and optimizer state included
    rows = []
    for kind in kinds:
        dtype = "float32" if kind == "plain" else resolve_dtype(config.model.dtype)  # PlainEngine: fp32 only
        rows.append(
            {
                **_summary(kind, dtype, records[kind]),
                "peak_mib": peak_bytes / 2**20,
                "peak_of": "cuda_allocated" if cuda else "rss",
            }
        )
    ratios = []
    if len(kinds) == 2:
        first, second = (records[kind][WARMUP_STEPS:] for kind in kinds)
        ratios = [a["seconds"] / b["seconds"] for a, b in zip(first, second, strict=True)]
    return {"rows": rows, "paired_ratios": ratios}


def run_engine(kind: str, overrides: Sequence[str] = (), steps: int = WARMUP_STEPS + 1) -> dict:
    """One engine alone in a fresh single-process subprocess with bench/common.py's measuring allocator
    settings (freed memory returned at once, so the resident-set high-water mark over the steps after the
    warm-up is what was live): its `peak_mib`."""
    spec = {"kinds": [kind], "overrides": list(overrides), "steps": steps, "threads": None}
    return run_point(__file__, spec)["rows"][0]


def compare_engines(
    overrides: Sequence[str] = (), steps: int = 5, threads: int | None = None, memory_run: bool = True
) -> dict:
    """ZeRO-3 against plain AdamW: the times from one fresh process where both engines take turns, with the
    allocator settings a run uses (model.cpu_allocator; the measuring settings would turn every
    allocation over 64 KiB into an mmap with its page faults), and each engine's peak from a fresh process of
    its own with the measuring settings. The timing process's high-water mark (both engines' weights) is not a
    per-engine figure and is not reported. Without `memory_run` (the smoke test) the peaks come from the timing
    process. Returns {"rows": [zero3, plain], "paired_ratios": [...], and the three ratios}."""
    spec = {"kinds": list(KINDS), "overrides": list(overrides), "steps": steps, "threads": threads}
    timing = run_point(__file__, spec, measuring=False)
    rows = timing["rows"]
    if memory_run:
        for row in rows:
            row["peak_mib"] = run_engine(row["engine"], overrides)["peak_mib"]
    zero3, plain = rows
    return {
        "rows": rows,
        "paired_ratios": timing["paired_ratios"],
        # the median of the per-step ratios: each pair of steps ran back to back, under the same conditions
        "zero3_over_plain_time": statistics.median(timing["paired_ratios"]),
        "zero3_over_plain_time_interval95": median_interval(timing["paired_ratios"]),
        "zero3_over_plain_cpu_time": zero3["cpu_s"] / plain["cpu_s"],
        "zero3_over_plain_peak_rss": zero3["peak_mib"] / plain["peak_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, T=24 (smoke test)")
    parser.add_argument("--steps", type=int, default=6, help=f"steps per engine, the first {WARMUP_STEPS} not timed")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "zero3_tax.json"))
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value for every engine")
    args = parser.parse_args()
    if args.point:
        spec = json.loads(args.point)
        print(json.dumps(measure_engines(spec["kinds"], spec["overrides"], spec["steps"], spec["threads"])))
        return
    overrides = [*STEP, *(QUICK if args.quick else []), *args.overrides]
    result = compare_engines(overrides, args.steps, args.threads, memory_run=not args.quick)
    print_table(
        f"world size 1, one full step (median of {args.steps - WARMUP_STEPS} after {WARMUP_STEPS} warm-up, the "
        f"engines taking turns in one process), {args.threads} threads: " + " ".join(overrides),
        result["rows"],
        ["engine", "dtype", "step_s", "worst_s", "cpu_s", "rollout_s", "learn_s", "peak_mib"],
    )
    interval = result["zero3_over_plain_time_interval95"]
    print(
        f"\nzero3 / plain: time {result['zero3_over_plain_time']:.3f}x (95% interval of the median: "
        + (f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "too few steps")
        + "; median of the per-step ratios "
        f"{', '.join(f'{r:.3f}' for r in result['paired_ratios'])}; target <= 1.05; CPU time "
        f"{result['zero3_over_plain_cpu_time']:.3f}x), peak memory {result['zero3_over_plain_peak_rss']:.3f}x "
        "(target <= 1.2)"
    )
    command = " ".join(["python", "bench/zero3_tax.py", *sys.argv[1:]])
    write_results(args.out, command=command, overrides=overrides, **result)


if __name__ == "__main__":
    main()
