"""`qstar-rl experiment`: does thinking help? A controlled, multi-seed comparison (docs/design.md, experiment).

    qstar-rl experiment --config qstar_rl/configs/experiment_cpu.yaml [key=value ...]

Arms (config.EXPERIMENT_ARMS), all from the same pretrained model, on the same windows in the same order (the
seed fixes both), with the same batch, steps and schedule; only the loss differs:
- base: the pretrained model, untrained;
- nll_control: fine-tuned with the base NLL alone, no thoughts (loss.objective=nll): what any fine-tuning gives;
- nll_control_compute: the same with Quiet-STaR's compute spent on more tokens: a global batch
  `compute_multiplier` times larger (measured: FLOPs of a quiet_star step over an NLL step);
- quiet_star: the method.

Each (arm, seed) trains in <run_root>/<arm>/seed<seed> (`qstar-rl train`, in a child process: an interrupted
run resumes from its last checkpoint), then is evaluated once; evaluation.json there marks it done, and a
restarted experiment skips it. Measured on held-out text (windows of the held-out corpora, the same for every
arm): mean NLL of each model's own prediction, and for quiet_star also with a greedy thought before every token
(mixed, as it would talk); the change per decile of the base model's NLL; held-out gsm_symbolic answer
probability (paper protocol) and exact match, with and without thinking; the training curves. Results go to
<out>.json, <out>.md and <out>.png.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from qstar_rl.checks import experiment_problems
from qstar_rl.config import (
    Config,
    ConfigError,
    ExperimentConfig,
    load_config,
    load_config_and_problems,
)
from qstar_rl.core.analysis import difficulty_deciles
from qstar_rl.flops import PhaseFlops

ARM_OVERRIDES = {
    "base": [],
    "nll_control": ["loss.objective=nll"],
    "nll_control_compute": ["loss.objective=nll"],  # plus the larger batch, see `arm_overrides`
    "quiet_star": [],
}


def arm_overrides(arm: str, train: Config, multiplier: int, micro_cap: int = 0) -> list[str]:
    """What an arm changes in the shared training config. nll_control_compute takes `multiplier` times the
    windows per step, in micro-batches as large as `micro_cap` allows where they divide evenly (an NLL forward of
    one small window leaves a CPU idle; the gradient is the mean over the step either way)."""
    extra = list(ARM_OVERRIDES[arm])
    if arm == "nll_control_compute":
        windows, micro = train.train.global_batch_size * multiplier, train.train.micro_batch_size
        micro = max(b for b in range(micro, max(micro, micro_cap) + 1) if windows % b == 0 and b % micro == 0)
        extra += [f"train.global_batch_size={windows}", f"train.micro_batch_size={micro}"]
    return extra


# ---- compute ------------------------------------------------------------------------------------------


def step_flops(train: Config, objective: str) -> int:
    """FLOPs of one full training step (sampling, scoring, backward; one micro-batch) of `objective`, counted by
    torch's flop counter formulas (qstar_rl.flops) on a throwaway copy of the model with a plain AdamW."""
    from qstar_rl.data import WindowStream
    from qstar_rl.engine import PlainEngine
    from qstar_rl.learner import train_step
    from qstar_rl.loading import build_thinking_lm

    config = dataclasses.replace(
        train,
        loss=dataclasses.replace(train.loss, objective=objective),
        train=dataclasses.replace(train.train, global_batch_size=train.train.micro_batch_size),
    )
    model, tokenizer = build_thinking_lm(config.model.name, config.thought, config.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    engine = PlainEngine(model, config)
    stream = WindowStream(config.data, tokenizer, seed=config.train.seed)
    batch = {k: v.to(device) for k, v in next(stream.batches(config.train.micro_batch_size)).items()}
    with PhaseFlops() as counter:
        train_step(engine, model, [batch], config, 0, lambda t: t.clone(), 1)
    return counter.total


def compute_multiplier(train: Config) -> dict:
    """How many NLL windows cost one Quiet-STaR window: the FLOPs ratio of the two steps, rounded up (the control
    gets at least Quiet-STaR's compute)."""
    thinking, plain = step_flops(train, "quiet_star"), step_flops(train, "nll")
    return {"quiet_star_step_flops": thinking, "nll_step_flops": plain, "multiplier": math.ceil(thinking / plain)}


# ---- evaluation ---------------------------------------------------------------------------------------


def heldout_answer_items(count: int):
    """gsm_symbolic items of the held-out templates (no training document of the math corpus uses them)."""
    from qstar_rl.corpus import gsm_entries
    from qstar_rl.eval import EvalItem

    return [EvalItem(e["question"].strip(), str(e["answer"]).strip()) for e in gsm_entries("heldout", count, 0)]


def load_arm_model(arm: str, run_dir: Path, train: Config):
    """The model an arm ended with (its run's last checkpoint; `base`: the pretrained one, untrained)."""
    from qstar_rl.generate import load_for_generation

    source = train.model.name if arm == "base" else str(run_dir)
    model, tokenizer = load_for_generation(source, train.thought.length)
    model.thought = dataclasses.replace(model.thought, **dataclasses.asdict(train.thought))
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def curves(run_dir: Path) -> dict[str, list[float]]:
    """Per-step training curves from the run's metrics.jsonl (empty without one)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    keys = ("loss/nll_base", "reward/mean", "reward/var_within_position", "mixing/weight_mean", "time/step")
    return {key: [row[key] for row in rows if key in row] for key in keys}


@torch.no_grad()
def evaluate_arm(arm: str, run_dir: Path, train: Config, e: ExperimentConfig) -> dict:
    """Held-out NLLs (per token too, for the decile analysis), answer metrics and curves of one finished run."""
    from qstar_rl.eval import evaluate
    from qstar_rl.report import effects_in_batches, heldout_windows

    model, tokenizer = load_arm_model(arm, run_dir, train)
    result: dict = {"arm": arm, "heldout": {}}
    for source in e.heldout_sources:
        input_ids, mask = heldout_windows(source, tokenizer, train.data.seq_len, e.heldout_windows)
        device = model.start_embedding.device
        effects = effects_in_batches(model, input_ids.to(device), mask.to(device))
        predicted = effects.predicted
        result["heldout"][source] = {
            "nll_no_think": float(effects.base_nll[predicted].mean()),
            "nll_think": float(effects.think_nll[predicted].mean()),
            "mixing_weight": float(effects.weight[predicted].mean()),
            "token_nll_no_think": effects.base_nll[predicted].tolist(),
            "token_nll_think": effects.think_nll[predicted].tolist(),
        }
    if e.answer_items:
        records = evaluate(
            model,
            tokenizer,
            heldout_answer_items(e.answer_items),
            generation=e.generation,
            max_new_tokens=e.max_new_tokens,
            protocol="paper",
        )
        for key in records[0]:
            if key.startswith(("answer_prob", "exact_match")):
                result[key] = statistics.fmean(r[key] for r in records)
    result["curves"] = curves(run_dir)
    return result


# ---- running ------------------------------------------------------------------------------------------


def train_arm(arm: str, seed: int, run_dir: Path, e: ExperimentConfig, multiplier: int, train: Config) -> None:
    """`qstar-rl train` for one (arm, seed) in a child process (its own process group and memory); it resumes
    from the run directory's last complete checkpoint if an earlier attempt was interrupted."""
    # train.report_windows=0: the experiment measures every arm itself, on more held-out text
    overrides = [
        *e.overrides,
        *arm_overrides(arm, train, multiplier, e.compute_micro_batch_size),
        f"train.seed={seed}",
        "train.report_windows=0",
    ]
    launcher = e.launcher or [sys.executable, "-m"]
    command = [*launcher, "qstar_rl.train", "--config", e.train_config, *overrides]
    command.append(f"train.run_dir={run_dir}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "experiment_train.log"
    with open(path, "a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        raise ExperimentError(f"training {arm} seed {seed} failed (exit {code}); its output: {path}")


class ExperimentError(RuntimeError):
    """An arm's training failed; the message names its log. Finished arms stay done for a restart."""


def run(e: ExperimentConfig, log=print) -> dict:
    """Run every missing (arm, seed), then write and return the results."""
    root = Path(e.run_root)
    root.mkdir(parents=True, exist_ok=True)
    train = load_config(e.train_config, e.overrides)
    state_path = root / "experiment_state.json"  # the measured multiplier, so that a restart keeps it
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    multiplier = e.compute_multiplier or 1
    if "nll_control_compute" in e.arms and not e.compute_multiplier:
        if "compute" not in state:
            log("measuring the compute multiplier (FLOPs of a quiet_star step / an NLL step) ...")
            state["compute"] = compute_multiplier(train)
            state_path.write_text(json.dumps(state, indent=2))
        multiplier = state["compute"]["multiplier"]
    evaluations: dict[str, dict[int, dict]] = {arm: {} for arm in e.arms}
    for seed in e.seeds:
        for arm in e.arms:
            # `base` is not trained and evaluates deterministically (greedy thoughts): once, for every seed
            run_dir = root / arm / ("all_seeds" if arm == "base" else f"seed{seed}")
            done = run_dir / "evaluation.json"
            if not done.is_file():
                start = time.perf_counter()
                if arm != "base":
                    log(f"training {arm} seed {seed} -> {run_dir}")
                    train_arm(arm, seed, run_dir, e, multiplier, train)
                log(f"evaluating {arm} seed {seed}")
                run_dir.mkdir(parents=True, exist_ok=True)
                result = {**evaluate_arm(arm, run_dir, train, e), "seconds": time.perf_counter() - start}
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the next arm's training needs this GPU's memory back
                partial = done.with_suffix(".tmp")
                partial.write_text(json.dumps(result))
                partial.replace(done)  # atomic: a half-written evaluation never counts as done
            evaluations[arm][seed] = json.loads(done.read_text())
    results = summarize(e, train, multiplier, state.get("compute"), evaluations)
    write_results(Path(e.out), results)
    return results


# ---- results ------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(e: ExperimentConfig, train: Config, multiplier: int, compute: dict | None, evaluations) -> dict:
    """The results JSON: per arm and seed the headline numbers, the decile table, the config."""
    headline = e.heldout_sources[0]
    arms: dict[str, dict] = {}
    for arm, by_seed in evaluations.items():
        runs = [by_seed[s] for s in e.seeds]
        thinks = arm == "quiet_star"
        entry: dict = {
            "heldout_nll": [r["heldout"][headline]["nll_think" if thinks else "nll_no_think"] for r in runs],
        }
        if thinks:
            entry["heldout_nll_no_think"] = [r["heldout"][headline]["nll_no_think"] for r in runs]
            entry["mixing_weight_heldout"] = [r["heldout"][headline]["mixing_weight"] for r in runs]
        for source in e.heldout_sources:
            key = source.replace("-", "_")
            entry[f"{key}_nll"] = [r["heldout"][source]["nll_think" if thinks else "nll_no_think"] for r in runs]
            if thinks:
                entry[f"{key}_nll_no_think"] = [r["heldout"][source]["nll_no_think"] for r in runs]
        for key in ("answer_prob", "answer_prob_no_think", "exact_match", "exact_match_no_think"):
            if key in runs[0]:
                entry[key] = [r[key] for r in runs]
        entry["train_seconds"] = [sum(r["curves"]["time/step"]) for r in runs]
        entry["curves"] = {s: by_seed[s]["curves"] for s in e.seeds} if arm != "base" else {}
        arms[arm] = entry
    return {
        "seeds": list(e.seeds),
        "headline_heldout": headline,
        "arms": arms,
        "by_decile": by_decile(e, evaluations, headline),
        "compute_multiplier": multiplier,
        "compute": compute,
        "config": {"experiment": dataclasses.asdict(e), "train": dataclasses.asdict(train)},
    }


def by_decile(e: ExperimentConfig, evaluations, source: str) -> dict:
    """Per decile of the base model's held-out NLL (easiest first): each arm's mean NLL change against the base
    model on the same tokens (negative: better), mean over seeds. Needs the base arm."""
    if "base" not in evaluations:
        return {}
    base_runs = evaluations["base"]
    base = torch.tensor(base_runs[e.seeds[0]]["heldout"][source]["token_nll_no_think"])
    table: dict[str, list[dict]] = {}
    variants = [(arm, "no_think") for arm in evaluations if arm != "base"]
    variants += [("quiet_star", "think")] if "quiet_star" in evaluations else []
    for arm, mode in variants:
        per_seed = [
            difficulty_deciles(base, torch.tensor(evaluations[arm][s]["heldout"][source][f"token_nll_{mode}"]))
            for s in e.seeds
        ]
        name = f"{arm}_think" if mode == "think" else arm
        table[name] = [
            {
                "decile": rows[0]["decile"],
                "base_nll": rows[0]["base_nll"],
                "delta_nll": [r["delta_nll"] for r in rows],
                "frac_helped": [r["frac_helped"] for r in rows],
            }
            for rows in zip(*per_seed, strict=True)
        ]
    return table


def results_markdown(results: dict) -> str:
    """The table of the README section: mean ± std over seeds per arm."""
    seeds = results["seeds"]
    lines = [
        f"Held-out NLL ({results['headline_heldout']}, lower is better), mean ± std over seeds {seeds}; "
        f"nll_control_compute gets {results['compute_multiplier']}x the tokens per step.",
        "",
        "| arm | held-out NLL | without thinking | " + " | ".join(_extra_columns(results)) + " |",
        "|---|---|---|" + "---|" * len(_extra_columns(results)),
    ]
    for arm, entry in results["arms"].items():
        cells = [arm, _fmt(entry["heldout_nll"]), _fmt(entry.get("heldout_nll_no_think", entry["heldout_nll"]))]
        cells += [_fmt(entry[key]) if key in entry else "" for key in _extra_columns(results)]
        lines.append("| " + " | ".join(cells) + " |")
    if results["by_decile"]:
        lines += ["", "NLL change against the base model per decile of its NLL (negative: better), mean over seeds:"]
        names = list(results["by_decile"])
        lines += ["", "| decile | base NLL | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for index, row in enumerate(results["by_decile"][names[0]]):
            deltas = [statistics.fmean(results["by_decile"][n][index]["delta_nll"]) for n in names]
            cells = [str(row["decile"]), f"{row['base_nll']:.3f}", *(f"{d:+.4f}" for d in deltas)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _extra_columns(results: dict) -> list[str]:
    first = next(iter(results["arms"].values()))
    keys = [k for k in first if k.endswith("_nll") and k != "heldout_nll"]
    return keys + [k for k in ("answer_prob", "answer_prob_no_think", "exact_match") if k in first]


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.4f} ± {std:.4f}"


def results_plot(results: dict) -> bytes:
    """Held-out NLL per arm (mean ± std), the per-decile change, and quiet_star's reward and mixing weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qstar_rl.report import figure_png

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(results["arms"])
    bars = [(n, results["arms"][n]["heldout_nll"]) for n in names]
    if "quiet_star" in results["arms"]:
        bars.append(("quiet_star\n(no thinking)", results["arms"]["quiet_star"]["heldout_nll_no_think"]))
    axes[0].bar(
        range(len(bars)), [_mean_std(v)[0] for _, v in bars], yerr=[_mean_std(v)[1] for _, v in bars], capsize=4
    )
    axes[0].set_xticks(range(len(bars)), [n for n, _ in bars], rotation=20, fontsize=8)
    low = min(_mean_std(v)[0] for _, v in bars)
    axes[0].set_ylim(low - 0.05 * abs(low) - 0.01, None)
    axes[0].set_title(f"held-out NLL ({results['headline_heldout']})")
    for name, rows in results["by_decile"].items():
        axes[1].plot([r["decile"] for r in rows], [statistics.fmean(r["delta_nll"]) for r in rows], "o-", label=name)
    axes[1].axhline(0, color="grey", linewidth=0.8)
    axes[1].set_xlabel("decile of the base model's NLL (hardest right)")
    axes[1].set_title("NLL change against base")
    axes[1].legend(fontsize=7)
    curves_by_seed = results["arms"].get("quiet_star", {}).get("curves", {})
    twin = axes[2].twinx()
    for seed, c in curves_by_seed.items():
        axes[2].plot(c["reward/mean"], color="tab:blue", alpha=0.6, label=f"reward, seed {seed}")
        twin.plot(c["mixing/weight_mean"], color="tab:orange", alpha=0.6, label=f"mixing weight, seed {seed}")
    axes[2].set_xlabel("step")
    axes[2].set_title("quiet_star: reward (blue), mixing weight (orange)")
    figure.tight_layout()
    return figure_png(figure)


def write_results(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(results_markdown(results))
    out.with_suffix(".png").write_bytes(results_plot(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qstar-rl experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiment YAML (qstar_rl/configs/experiment_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value for the experiment config (e.g. seeds=0,1)")
    args = parser.parse_args(argv)
    try:
        e, problems = load_config_and_problems(args.config, args.overrides, schema=ExperimentConfig)
        problems += experiment_problems(e)
    except ConfigError as err:
        problems = err.problems
    if problems:
        print("invalid experiment config:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2
    try:
        results = run(e, log=lambda message: print(message, file=sys.stderr, flush=True))
    except ExperimentError as err:
        print(f"qstar-rl experiment: {err}", file=sys.stderr)
        return 1
    print(results_markdown(results))
    print(f"wrote {e.out}.json, {e.out}.md, {e.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
