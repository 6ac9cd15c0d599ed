"""What activation checkpointing saves: peak memory and time of one learner step, with and without it.

    python bench/checkpointing.py --threads 1   # SmolLM2-135M, T=256, fp32 and bf16 (CPU: ~15 min), writes
                                                # bench/results/checkpointing.json
    python bench/checkpointing.py --quick       # tiny model, T=32 (smoke test)

A learner step is the trainer's own `learner.learn_step` (score with gradients, losses, backward, AdamW step)
on a DeepSpeed ZeRO-3 engine at world size 1, built from the default config with only T and
`model.gradient_checkpointing` changed, after a rollout of the same window. Each point runs in a fresh
subprocess; one warm-up step first (it allocates the Adam moments), then the measured step. On CPU the peak is
the resident-set high-water mark above the level right before the step (reset through /proc/self/clear_refs;
glibc told to return freed blocks at once), on GPU torch.cuda.max_memory_allocated above the allocated level.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, peak, print_table, reset_peak, run_point, use_the_trainers_cpu_allocator, write_results

from qstar_rl.config import load_config
from qstar_rl.data import WindowStream
from qstar_rl.engine import (
    all_reduce_sum,
    build_thinking_engine,
    init_distributed,
)
from qstar_rl.learner import learn_step
from qstar_rl.rollout import rollout

ROOT = Path(__file__).parents[1]
DEFAULT = ROOT / "qstar_rl" / "configs" / "default.yaml"


def step_point(spec: dict) -> dict:
    """One measured learner step (runs inside a fresh subprocess)."""
    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix="qbench") as tmp:
        overrides = [
            f"model.name={spec['model']}",
            f"data.seq_len={spec['T']}",
            f"model.gradient_checkpointing={str(spec['checkpointing']).lower()}",
            f"model.dtype={spec['dtype']}",
            f"train.run_dir={tmp}",
            "train.steps=10",
        ]
        config = load_config(DEFAULT, overrides)
        use_the_trainers_cpu_allocator(config.model)
        _, world, local_rank = init_distributed()
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        model, tokenizer, engine, full_weights = build_thinking_engine(config, world)
        stream = WindowStream(config.data, tokenizer, seed=0)
        batches = stream.batches(config.train.micro_batch_size)
        seconds, growth = 0.0, 0
        for step in range(2):  # warm-up, then measured
            batch = {k: v.to(device) for k, v in next(batches).items()}
            thoughts = [rollout(model, batch, config.train.seed, step, full_weights())]
            base = reset_peak()
            start = time.perf_counter()
            result = learn_step(engine, thoughts, config, step, all_reduce_sum, world)
            growth = peak() - base  # synchronises the device before the clock stops
            seconds = time.perf_counter() - start
        assert not result.skipped
    return {**spec, "peak_mib": growth / 2**20, "learn_s": seconds, "loss_total": result.metrics["loss/total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, T=32 (smoke test)")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "checkpointing.json"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per step")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="model.dtype values to measure")
    args = parser.parse_args()
    if args.point:
        print(json.dumps(step_point(json.loads(args.point))))
        return
    model, seq_len = ("tiny-llama", 32) if args.quick else ("smollm2-135m", 256)
    specs = [
        {"model": model, "T": seq_len, "dtype": dtype, "checkpointing": on, "threads": args.threads}
        for dtype in args.dtypes.split(",")
        for on in (False, True)
    ]
    rows = [run_point(__file__, spec) for spec in specs]
    ratios = {}
    for off, on in zip(rows[::2], rows[1::2], strict=True):
        ratios[off["dtype"]] = {
            "peak_with_over_without": on["peak_mib"] / off["peak_mib"],
            "time_with_over_without": on["learn_s"] / off["learn_s"],
        }
    print_table(
        f"learner step of {model} at T={seq_len} (default config otherwise), {args.threads} thread(s), "
        "with and without activation checkpointing",
        rows,
        ["dtype", "checkpointing", "peak_mib", "learn_s", "loss_total"],
    )
    for dtype, ratio in ratios.items():
        memory, time_ratio = ratio["peak_with_over_without"], ratio["time_with_over_without"]
        print(f"{dtype}: with / without: peak memory {memory:.2f}x, time {time_ratio:.2f}x")
    write_results(
        args.out, command=" ".join(["python", "bench/checkpointing.py", *sys.argv[1:]]), rows=rows, ratios=ratios
    )


if __name__ == "__main__":
    main()
