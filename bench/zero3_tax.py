"""The ZeRO-3 tax at one rank: a full training step under DeepSpeed ZeRO-3 against the same step with a plain
torch AdamW (`qstar_rl.engine.PlainEngine`), same model, same data, same thoughts.

    python bench/zero3_tax.py            # SmolLM2-135M fp32, T=64, R=2, M=5, K=4, B=1 (CPU: ~5 min on 2 cores),
                                         # writes bench/results/zero3_tax.json
    python bench/zero3_tax.py --quick    # tiny model, one subprocess per engine (smoke test)

Engines (`KINDS`): `zero3` is the trainer's engine (`engine.build_thinking_engine`, so at one rank with
`engine.ONE_RANK_ZERO3` and `engine.drop_one_rank_zero3_overheads`); `plain` is PlainEngine over the same model.

A step is the trainer's own `learner.train_step` (rollout with the gathered weights, score with gradients,
losses, backward, optimizer step), built from qstar_rl/configs/default.yaml with the sizes above and
`model.dtype=float32` (PlainEngine has no mixed precision). Each engine runs in a fresh subprocess at world size
1, twice (`run_engine`): its time is the median of the steps after the first two (warm-up: the Adam moments,
allocator growth) with the allocator settings a run uses (`engine.keep_freed_memory_for_reuse`, both engines),
and `worst_s` the slowest step after the first; its peak the process's resident-set high-water mark over the
step after the warm-up (reset through /proc/self/clear_refs),
in a second run where glibc returns freed blocks at once, or on GPU torch.cuda.max_memory_allocated. The peak is
absolute: weights, gradients and optimizer state count, since they are what the tax is about. Other processes on
the machine skew the times (`cpu_s`, the process's CPU seconds, less so): compare the rows of one run.

`measure_engine(kind, overrides)` measures one engine in the calling process; `run_engine(kind, overrides)` does
it in fresh subprocesses (what a comparison should use).
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
from common import RESULTS, peak, print_table, reset_peak, run_point, write_results

from qstar_rl.config import Config, load_config
from qstar_rl.data import WindowStream
from qstar_rl.engine import (
    PlainEngine,
    all_reduce_sum,
    build_thinking_engine,
    init_distributed,
    keep_freed_memory_for_reuse,
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
PEAKS = ("peak_mib", "peak_mib_run_allocator")


def build(kind: str, config: Config):
    """(model, tokenizer, engine, full_weights, world) for one of KINDS."""
    if kind == "zero3":
        _, world, _ = init_distributed()
        model, tokenizer, engine, full_weights = build_thinking_engine(config, world)
        return model, tokenizer, engine, full_weights, world
    keep_freed_memory_for_reuse()  # as init_distributed does for the trainer's own engines
    lm, tokenizer = load_lm(config.model.name, seed=config.train.seed)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    model = ThinkingLM(lm, config.thought, tokenizer=tokenizer).to(_device())
    return model, tokenizer, PlainEngine(model, config), None, 1


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def measure_engine(kind: str, overrides: Sequence[str] = (), steps: int = 5, threads: int | None = None) -> dict:
    """Time and peak memory of `steps` full training steps of engine `kind` (one of KINDS) in this process,
    on the default config plus `overrides`. Run it in a fresh process (see `run_engine`): the peak is the
    process's, and DeepSpeed's process group stays for the rest of the process."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if steps <= WARMUP_STEPS:
        raise ValueError(f"steps must exceed the {WARMUP_STEPS} warm-up steps, got {steps}")
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="qbench") as tmp:
        config = load_config(DEFAULT, [*overrides, f"train.steps={steps}", f"train.run_dir={tmp}"])
        torch.manual_seed(config.train.seed)
        model, tokenizer, engine, full_weights, world = build(kind, config)
        device = _device()
        batches = WindowStream(config.data, tokenizer, seed=config.train.seed).batches(config.train.micro_batch_size)
        seconds, cpu_seconds, losses, phases = [], [], [], []
        for step in range(steps):
            if step == WARMUP_STEPS:  # the peak of the measured steps only
                reset_peak()
            batch = {k: v.to(device) for k, v in next(batches).items()}
            start, cpu_start = time.perf_counter(), time.process_time()
            result = train_step(engine, model, [batch], config, step, all_reduce_sum, world, full_weights)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            losses.append(result.metrics["loss/total"])
            phases.append((result.metrics["time/rollout"], result.metrics["time/learn"]))
        peak_bytes = peak()  # absolute: weights, gradients and optimizer state included
    return {
        "engine": kind,
        "dtype": "float32" if kind == "plain" else resolve_dtype(config.model.dtype),  # PlainEngine: fp32 only
        "threads": torch.get_num_threads(),
        "step_s": statistics.median(seconds[WARMUP_STEPS:]),
        "worst_s": max(seconds[1:]),
        # CPU seconds of all the process's threads: less sensitive than wall time to other processes sharing the
        # cores (on a GPU it misses the device time; read step_s there)
        "cpu_s": statistics.median(cpu_seconds[WARMUP_STEPS:]),
        "rollout_s": statistics.median(p[0] for p in phases[WARMUP_STEPS:]),
        "learn_s": statistics.median(p[1] for p in phases[WARMUP_STEPS:]),
        "peak_mib": peak_bytes / 2**20,
        "peak_of": "cuda_allocated" if cuda else "rss",
        "loss_step1": losses[0],
        "step_times": seconds,
        "cpu_times": cpu_seconds,
        "losses": losses,
    }


def run_engine(
    kind: str, overrides: Sequence[str] = (), steps: int = 5, threads: int | None = None, memory_run: bool = True
) -> dict:
    """`measure_engine` in fresh single-process subprocesses: the times from one with the allocator settings a
    run uses (engine.keep_freed_memory_for_reuse; bench/common.py's measuring settings turn every allocation over
    64 KiB into an mmap with its page faults, which slows the engine that allocates more, and the comparison with
    it), the peak from one with the measuring settings (freed memory returned at once, so the high-water mark is
    what was live). The timing run's own high-water mark is kept as `peak_mib_run_allocator`. Without
    `memory_run` (the smoke test) the timing run's high-water mark stands for both."""
    spec = {"kind": kind, "overrides": list(overrides), "steps": steps, "threads": threads}
    timing = run_point(__file__, spec, measuring=False)
    memory = run_point(__file__, {**spec, "steps": WARMUP_STEPS + 1}) if memory_run else timing
    return {**timing, "peak_mib": memory["peak_mib"], "peak_mib_run_allocator": timing["peak_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, T=24 (smoke test)")
    parser.add_argument("--steps", type=int, default=5, help=f"steps per engine, the first {WARMUP_STEPS} not timed")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per engine")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "zero3_tax.json"))
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value for every engine")
    args = parser.parse_args()
    if args.point:
        spec = json.loads(args.point)
        print(json.dumps(measure_engine(spec["kind"], spec["overrides"], spec["steps"], spec["threads"])))
        return
    overrides = [*STEP, *(QUICK if args.quick else []), *args.overrides]
    rows = {kind: run_engine(kind, overrides, args.steps, args.threads, memory_run=not args.quick) for kind in KINDS}
    plain = rows["plain"]
    ratios = {
        "zero3_over_plain_time": rows["zero3"]["step_s"] / plain["step_s"],
        "zero3_over_plain_cpu_time": rows["zero3"]["cpu_s"] / plain["cpu_s"],
        "zero3_over_plain_peak_rss": rows["zero3"]["peak_mib"] / plain["peak_mib"],
    }
    print_table(
        f"world size 1, one full step (median of {args.steps - WARMUP_STEPS} after {WARMUP_STEPS} warm-up), "
        f"{args.threads} threads: " + " ".join(overrides),
        list(rows.values()),
        [*("engine", "dtype", "step_s", "worst_s", "cpu_s", "rollout_s", "learn_s"), *PEAKS],
    )
    print(
        f"\nzero3 / plain: time {ratios['zero3_over_plain_time']:.3f}x (target <= 1.05; CPU time "
        f"{ratios['zero3_over_plain_cpu_time']:.3f}x), peak memory {ratios['zero3_over_plain_peak_rss']:.3f}x "
        "(target <= 1.2)"
    )
    command = " ".join(["python", "bench/zero3_tax.py", *sys.argv[1:]])
    write_results(args.out, command=command, overrides=overrides, rows=list(rows.values()), **ratios)


if __name__ == "__main__":
    main()
