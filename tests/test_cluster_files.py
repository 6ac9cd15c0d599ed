"""The files in cluster/ stay true: they parse, the job they submit is a valid config, and the Ray resources
they declare hold the actors that job plans."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from qstar_rl.checks import run_problems
from qstar_rl.config import load_config, validate_cluster
from qstar_rl.ray_train import resource_problems, submitted_job_problems

ROOT = Path(__file__).parents[1]
CLUSTER = ROOT / "cluster"


def job_problems(entrypoint: str, nodes: list[dict[str, float]], monkeypatch) -> list[str]:
    """Every problem `python -m qstar_rl.ray_train ...` would report for this entrypoint on these nodes."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "qstar_rl.ray_train"] and argv[3] == "--config"
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # as under `ray job submit`
    config = load_config(argv[4], argv[5:])
    return (
        run_problems(config, config.cluster.learners)
        + validate_cluster(config)
        + submitted_job_problems(config)
        + resource_problems(config.cluster, nodes)
    )


def test_the_kuberay_job_fits_its_own_cluster(monkeypatch):
    job = next(d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d["kind"] == "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    nodes = [{"CPU": float(head["cpu"]), "GPU": 0.0}]
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes += [{"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}] * group["minReplicas"]
    assert job_problems(job["spec"]["entrypoint"], nodes, monkeypatch) == []
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]


def test_the_ray_up_cluster_fits_the_job_in_its_header(monkeypatch):
    text = (CLUSTER / "ray_up.yaml").read_text()
    launcher = yaml.safe_load(text)
    nodes = []
    for name, node_type in launcher["available_node_types"].items():
        count = 1 if name == launcher["head_node_type"] else node_type["min_workers"]
        nodes += [{k: float(v) for k, v in node_type["resources"].items()}] * count
    # The header's submit command, joined across its continuation lines.
    header = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(header) if line.startswith("python -m qstar_rl.ray_train"))
    entrypoint = " ".join(line.rstrip("\\").strip() for line in header[start : start + 2])
    assert job_problems(entrypoint, nodes, monkeypatch) == []


def test_the_runtime_env_keeps_the_upload_small():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert {".git", ".venv", "runs"} <= set(env["excludes"])


def test_the_slurm_script_is_valid_bash_and_submits_the_driver():
    script = CLUSTER / "slurm_ray.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert os.access(script, os.X_OK) and "#SBATCH --nodes" in text
    assert "ray job submit" in text and "python -m qstar_rl.ray_train" in text and "ray stop" not in text


@pytest.mark.parametrize("name", ["rayjob.yaml", "ray_up.yaml"])
def test_cluster_files_use_a_shared_absolute_run_dir(name):
    assert "train.run_dir=/" in (CLUSTER / name).read_text()
