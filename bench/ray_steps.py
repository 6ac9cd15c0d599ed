"""Per-phase times of a Ray step (rollout actors + ZeRO-3 learner actors) against the colocated steps, and the
weight-sync time of SmolLM2-135M.

    python bench/ray_steps.py              # CPU: ~6 min on 2 cores, writes bench/results/ray_steps.json
    python bench/ray_steps.py --quick      # tiny model, 2 steps, Ray vs deepspeed only (smoke test)
    python bench/ray_steps.py --gpus       # one GPU per actor (a node with >= 3 GPUs)

Every run is a real `qstar-rl ray-train` / `qstar-rl train` subprocess on the same machine (a private local
Ray cluster for the Ray runs) with the same global batch (2 learner ranks x 1 sequence, or 1 rank with 2
accumulation micro-batches). The phases are the run's own `time/*` metrics, median over the steps after the
first (which includes warm-up):
- `ray`: 2 learner actors + 1 rollout actor; weight_sync = gather the ZeRO-3 partitions, put them in the object
  store in chunks, load them on the rollout actor;
- `ray-colocated`: 2 learner actors that sample themselves (`cluster.colocate=true`); weight_sync = gathering
  the partitions for rollout;
- `deepspeed`: the `qstar-rl train` path, 1 ZeRO-3 rank.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import print_table, write_results

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
PHASES = ("time/rollout", "time/learn", "time/weight_sync", "time/step")
OTHERS = ("ray-colocated", "deepspeed")
TWO_RANKS = ["cluster.learners=2", "cluster.rollout_workers=1", "train.micro_batch_size=1", "train.global_batch_size=2"]


def run(entry: str, config: str, overrides: list[str], gpus: bool) -> list[dict]:
    """Run one training job in a subprocess; returns its metrics.jsonl rows."""
    with tempfile.TemporaryDirectory(prefix="qbench") as tmp:
        run_dir = Path(tmp) / "run"
        module = {"ray": "qstar_rl.ray_train", "deepspeed": "qstar_rl.train"}[entry]
        cmd = [sys.executable, "-m", module, "--config", config, f"train.run_dir={run_dir}", *overrides]
        if entry == "ray" and not gpus:
            cmd += ["cluster.gpus_per_learner=0", "cluster.gpus_per_rollout=0"]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)  # a private local cluster per run
        if not gpus:
            env["DS_ACCELERATOR"] = "cpu"
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def phase_row(model: str, mode: str, rows: list[dict]) -> dict:
    steady = rows[1:] or rows  # step 1 includes warm-up (first gathers, allocator growth)
    row = {"model": model, "mode": mode, "steps": len(steady)}
    for key in PHASES:
        row[key.split("/")[1]] = statistics.median(r[key] for r in steady)
    row["tokens_per_s"] = statistics.median(r["perf/tokens_per_s"] for r in steady)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps, no colocated run (smoke test)")
    parser.add_argument("--gpus", action="store_true", help="one GPU per actor instead of CPU")
    parser.add_argument("--out", default=str(RESULTS / "ray_steps.json"))
    args = parser.parse_args()

    tiny, smollm2 = "qstar_rl/configs/tiny.yaml", "qstar_rl/configs/default.yaml"
    steps = ["train.steps=2"] if args.quick else ["train.steps=6"]
    quiet = ["train.checkpoint_every=1000", "train.thought_table_every=0", "wandb.mode=disabled"]
    plans = [
        ("tiny-llama", "ray", "ray", tiny, [*TWO_RANKS, *steps, *quiet]),
        ("tiny-llama", "deepspeed", "deepspeed", tiny, ["train.micro_batch_size=1", *steps, *quiet]),
    ]
    if not args.quick:  # a second private Ray cluster (~45 s on 2 cores) and the real model
        colocated = [*TWO_RANKS, "cluster.colocate=true", *steps, *quiet]
        plans.insert(1, ("tiny-llama", "ray-colocated", "ray", tiny, colocated))
        # Short windows: the sync moves the same 135M parameters whatever T is, and the steps stay short.
        small = ["data.seq_len=32", "train.steps=3", *quiet]
        plans.append(("smollm2-135m", "ray", "ray", smollm2, [*TWO_RANKS, *small]))

    phases, runs = [], []
    for model, mode, entry, config, overrides in plans:
        print(f"running {model} {mode} ...", flush=True)
        rows = run(entry, config, overrides, args.gpus)
        phases.append(phase_row(model, mode, rows))
        kept = [{k: r[k] for k in ("step", *PHASES)} for r in rows]
        runs.append({"model": model, "mode": mode, "command": [entry, config, *overrides], "rows": kept})

    columns = ["model", "mode", "steps", "rollout", "learn", "weight_sync", "step", "tokens_per_s"]
    print_table("Per-phase seconds (median over steps 2..N)", phases, columns)
    base = {row["mode"]: row for row in phases if row["model"] == "tiny-llama"}
    ratios = []
    for key in PHASES:
        name = key.split("/")[1]
        others = [m for m in OTHERS if m in base]
        ratios.append({"phase": name, **{f"ray / {m}": base["ray"][name] / base[m][name] for m in others}})
    print_table("tiny-llama: Ray step relative to the colocated steps", ratios, list(ratios[0]))

    write_results(args.out, gpus=args.gpus, quick=args.quick, phases=phases, ratios=ratios, runs=runs)


if __name__ == "__main__":
    main()
