"""qstar-rl experiment (qstar_rl/experiment.py): the controlled comparison runs end to end on the tiny model,
resumes, and writes the results the README section shows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qstar_rl.config import ExperimentConfig, load_config_and_problems, validate_experiment

ROOT = Path(__file__).parents[1]


def tiny_experiment(tmp_path: Path, **changes) -> Path:
    spec = {
        "train_config": "qstar_rl/configs/tiny.yaml",
        "overrides": [
            *("data.source=math", "train.steps=2", "train.thought_table_every=0"),
            "wandb.mode=disabled",  # its service costs seconds a run
        ],
        "arms": ["base", "nll_control_compute", "quiet_star"],
        "seeds": [0, 1],
        "heldout_sources": ["math-heldout", "wiki-heldout"],
        "heldout_windows": 3,
        "answer_items": 3,
        "max_new_tokens": 2,
        "run_root": str(tmp_path / "runs"),
        "out": str(tmp_path / "results" / "thinking_effect"),
        **changes,
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_experiment(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qstar_rl.experiment", "--config", str(config), *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=1200)


def test_every_problem_of_an_experiment_config_is_listed(tmp_path):
    config = tiny_experiment(tmp_path, arms=["base", "dreaming"], seeds=[1, 1], overrides=["train.steps=0"])
    proc = run_experiment(config, "heldout_windows=0", "colour=red")
    assert proc.returncode == 2
    for expected in (
        "arms: must be one of",
        "seeds: need at least one seed",
        "heldout_windows: must be >= 1",
        "colour: unknown key",
        "overrides: train.steps: must be >= 1",
    ):
        assert expected in proc.stderr, expected


def test_the_cpu_and_gpu_experiment_configs_are_valid():
    for name in ("experiment_cpu.yaml", "experiment_gpu.yaml"):
        e, problems = load_config_and_problems(ROOT / "qstar_rl" / "configs" / name, schema=ExperimentConfig)
        assert problems == [] and validate_experiment(e) == [], name


@pytest.mark.slow
def test_the_experiment_runs_every_arm_and_seed_then_skips_them_when_restarted(tmp_path):
    config = tiny_experiment(tmp_path)
    proc = run_experiment(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "results" / "thinking_effect"
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["seeds"] == [0, 1]
    assert set(results["arms"]) == {"base", "nll_control_compute", "quiet_star"}
    for arm, entry in results["arms"].items():
        assert len(entry["heldout_nll"]) == 2 and all(0 < v < 20 for v in entry["heldout_nll"]), arm
        assert len(entry["answer_prob"]) == 2 and len(entry["exact_match"]) == 2, arm
    quiet_star = results["arms"]["quiet_star"]
    assert len(quiet_star["heldout_nll_no_think"]) == 2 and len(quiet_star["wiki_heldout_nll"]) == 2
    assert results["arms"]["base"]["heldout_nll"][0] == results["arms"]["base"]["heldout_nll"][1]  # untrained
    # the two seeds saw different windows and thoughts, so the trained arms differ
    assert quiet_star["heldout_nll"][0] != quiet_star["heldout_nll"][1]
    # the measured compute multiplier made the control's batch larger, and its run used it
    multiplier = results["compute_multiplier"]
    assert multiplier > 1 and results["compute"]["quiet_star_step_flops"] > results["compute"]["nll_step_flops"]
    run_config = yaml.safe_load((tmp_path / "runs" / "nll_control_compute" / "seed1" / "config.yaml").read_text())
    assert run_config["train"]["global_batch_size"] == 2 * multiplier and run_config["loss"]["objective"] == "nll"
    assert run_config["train"]["seed"] == 1
    assert set(results["by_decile"]) == {"nll_control_compute", "quiet_star", "quiet_star_think"}
    assert all(len(row["delta_nll"]) == 2 for row in results["by_decile"]["quiet_star_think"])
    assert len(quiet_star["curves"]["0"]["reward/mean"]) == 2
    assert "| quiet_star |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # a restart finds every run evaluated and only rewrites the results
    again = run_experiment(config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stderr and "evaluating" not in again.stderr
    assert json.loads(out.with_suffix(".json").read_text())["arms"] == results["arms"]


def test_a_failed_training_names_its_log_and_exits_1(tmp_path):
    config = tiny_experiment(tmp_path, arms=["nll_control"], seeds=[0], launcher=["false"])
    proc = run_experiment(config)
    assert proc.returncode == 1
    log = tmp_path / "runs" / "nll_control" / "seed0" / "experiment_train.log"
    assert f"training nll_control seed 0 failed (exit 1); its output: {log}" in proc.stderr
    assert "Traceback" not in proc.stderr
