"""Step time and resident set of a long-window step under CPU allocator choices (CPU under glibc only).

    python bench/allocators.py                      # SmolLM2-135M, T=1024, checkpointing, 2 steps, every variant
    python bench/allocators.py --variants reuse,glibc model.dtype=float32
    python bench/allocators.py --quick              # tiny model, T=64 (smoke test)

Each variant runs in a fresh process with the default config at T=1024 and activation checkpointing (what
a long window needs): build the ZeRO-3 engine, then `--steps` steps as the trainer runs them
(bench/step_cost.run_step), each timed, with the process's resident set (VmRSS) and its high-water mark (VmHWM)
after every phase, and glibc's own accounting (mallinfo2: heap size, bytes in use and free in it, bytes in
mmapped blocks; zeros under jemalloc) after every step. Variants:
- reuse: `engine.keep_freed_memory_for_reuse` (model.cpu_allocator 'reuse');
- glibc: glibc's defaults (model.cpu_allocator 'glibc');
- mmap4: glibc's defaults but a fixed mmap threshold of 4 MiB (every block from 4 MiB up returned at free);
- jemalloc: Ray's bundled libjemalloc preloaded, purging off (model.cpu_allocator 'jemalloc', and 'auto' with
  checkpointing where Ray ships it).
Writes bench/results/allocators.json: per variant, the per-step rows and the peak resident MiB.
"""

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, print_table, run_point, write_results

from qstar_rl.config import ModelConfig, load_config
from qstar_rl.data import WindowStream
from qstar_rl.engine import (
    GLIBC_MALLOC_VARIABLES,
    build_thinking_engine,
    cpu_allocator_environment,
    init_distributed,
    keep_freed_memory_for_reuse,
)

ROOT = Path(__file__).parents[1]
DEFAULT = ROOT / "qstar_rl" / "configs" / "default.yaml"
SHAPE = ["data.seq_len=1024", "model.gradient_checkpointing=true"]
QUICK = ["model.name=tiny-llama", "data.seq_len=64", "model.gradient_checkpointing=true"]
M_MMAP_THRESHOLD = -3  # malloc.h
VARIANTS = ("reuse", "glibc", "mmap4", "jemalloc")


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (malloc.h): ten size_t counters."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def memory_mib() -> dict[str, int]:
    """VmRSS and VmHWM of this process, and glibc's heap / in-use / free-in-heap / mmapped bytes, in MiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    out = {key: int(status[key].split()[0]) // 1024 for key in ("VmRSS", "VmHWM")}
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    out.update(heap=info.arena >> 20, in_use=info.uordblks >> 20, free=info.fordblks >> 20, mmapped=info.hblkhd >> 20)
    return out


def variant_env(variant: str) -> dict[str, str]:
    """What a variant's process gets on top of this one's environment (which must set none of glibc's
    allocator variables: the variants set the allocator themselves)."""
    if variant != "jemalloc":
        return {}
    environment = cpu_allocator_environment(ModelConfig(cpu_allocator="jemalloc"), on_gpu=False, environ={})
    if not environment:
        raise SystemExit("no jemalloc here (Ray's Linux wheels ship one): leave out the jemalloc variant")
    return environment


def run_variant(spec: dict) -> list[dict]:
    """In this (fresh) process: apply the variant, build the engine, run and measure the steps."""
    from step_cost import run_step

    torch.set_num_threads(spec["threads"])
    libc = ctypes.CDLL(None)
    if spec["variant"] == "reuse":
        assert keep_freed_memory_for_reuse(torch.device("cpu"))
    elif spec["variant"] == "mmap4":
        assert libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qbench") as tmp:
        config = load_config(DEFAULT, [*spec["overrides"], f"train.run_dir={tmp}", "train.steps=100"])
        _, world, _ = init_distributed()
        model, tokenizer, engine, full_weights = build_thinking_engine(config, world)
        batches = WindowStream(config.data, tokenizer, seed=0).batches(config.train.micro_batch_size)
        rows.append({"step": "built", **memory_mib()})
        for step in range(spec["steps"]):
            row: dict = {"step": step + 1}
            last = [time.perf_counter()]

            def mark(phase: str, row: dict = row, last: list = last) -> None:
                now = time.perf_counter()
                row[f"{phase}_s"], last[0] = now - last[0], now
                row[f"{phase}_rss_mib"] = memory_mib()["VmRSS"]

            start = time.perf_counter()
            run_step(model, engine, full_weights, next(batches), config, step, mark)
            rows.append({**row, "seconds": time.perf_counter() - start, **memory_mib()})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, T=64 (smoke test)")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(RESULTS / "allocators.json"))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every variant (e.g. model.dtype=float32)")
    args = parser.parse_args()
    if not args.point and (already := [name for name in GLIBC_MALLOC_VARIABLES if name in os.environ]):
        parser.error(f"unset {', '.join(already)}: each variant sets glibc's allocator itself")
    if args.point:
        print(json.dumps(run_variant(json.loads(args.point))))
        return
    results = {}
    for variant in args.variants.split(","):
        spec = {"variant": variant, "steps": args.steps, "threads": args.threads}
        spec["overrides"] = [*(QUICK if args.quick else SHAPE), *args.overrides]
        rows = run_point(__file__, spec, variant_env(variant), measuring=False)
        results[variant] = {"rows": rows, "peak_resident_mib": max(row["VmHWM"] for row in rows)}
    table = [
        {
            "variant": variant,
            **{f"step {row['step']} s": row["seconds"] for row in result["rows"][1:]},
            "peak resident MiB": result["peak_resident_mib"],
            "free in heap MiB": result["rows"][-1]["free"],
        }
        for variant, result in results.items()
    ]
    print_table(f"{' '.join(spec['overrides'])}, {args.threads} threads", table, list(table[0]))
    command = " ".join(["python", "bench/allocators.py", *sys.argv[1:]])
    write_results(args.out, command=command, overrides=spec["overrides"], threads=args.threads, variants=results)


if __name__ == "__main__":
    main()
