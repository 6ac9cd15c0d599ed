"""Ray orchestration on a private loopback Ray cluster (started and stopped here, never `ray stop`): `ray job
submit`, equality with the `deepspeed` path, exact weight sync, resource checks, killed actors, async and
colocated modes."""

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from ray_cluster import BIN, LocalRayCluster, cluster_env
from test_train import EVAL, EVAL_KEYS, METRIC_KEYS, TINY, metrics

from qstar_rl.config import load_config
from qstar_rl.data import WindowStream
from qstar_rl.loading import load_tokenizer
from qstar_rl.ray_train import ActorGroup, main, wait_all

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
# 2 learner ranks with 1 sequence each and 1 rollout actor, on CPU: the global batch of the reference run.
RAY_ARGS = [
    "cluster.learners=2",
    "cluster.rollout_workers=1",
    "cluster.gpus_per_learner=0",
    "cluster.gpus_per_rollout=0",
    "train.step_timeout_s=180",
    "train.micro_batch_size=1",
    "train.global_batch_size=2",
]
COMPARED = ("loss/total", "loss/policy", "loss/nll_base", "loss/nll_talk", "reward/mean", "optim/grad_norm")


@pytest.fixture(scope="module")
def cluster():
    local = LocalRayCluster(num_cpus=4)
    yield local
    local.stop()


@pytest.fixture(scope="module")
def reference(one_rank_reference) -> list[dict]:
    """The colocated `deepspeed` path (1 ZeRO-3 rank, 2 accumulation micro-batches of 1): same global batch."""
    return metrics(one_rank_reference)


def ray_train(cluster: LocalRayCluster, run_dir: Path, *overrides: str, timeout: float = 600, **env: str):
    cmd = [sys.executable, "-m", "qstar_rl.ray_train", "--config", str(TINY), f"train.run_dir={run_dir}"]
    cmd += ["wandb.mode=disabled"]  # the wandb service costs seconds a start; the job-submit test keeps it
    return subprocess.run(
        [*cmd, *RAY_ARGS, *overrides],
        cwd=ROOT,
        env=cluster_env(RAY_ADDRESS=cluster.address, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_same_trajectory(rows: list[dict], reference: list[dict]) -> None:
    assert rows
    for row, ref in zip(rows, reference, strict=False):
        assert row["step"] == ref["step"]
        for key in COMPARED:
            assert row[key] == pytest.approx(ref[key], abs=1e-4, rel=1e-4), (row["step"], key)


def test_ray_job_submit_trains_like_the_deepspeed_path(cluster, reference, tmp_path):
    run_dir = tmp_path / "run"
    entrypoint = ["python", "-m", "qstar_rl.ray_train", "--config", "qstar_rl/configs/tiny.yaml"]
    entrypoint += [f"train.run_dir={run_dir}", "train.steps=3", "train.checkpoint_every=3", *RAY_ARGS]
    entrypoint += ["model.gradient_checkpointing=true"]  # learner-only actors checkpoint too (train mode)
    submit = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT)]
    submit += ["--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--", *entrypoint]
    proc = subprocess.run(submit, cwd=ROOT, env=cluster_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        missing = [k for k in [*METRIC_KEYS, "policy/version", "policy/staleness"] if k not in row]
        assert not missing, missing
        assert row["policy/staleness"] == 0 and abs(row["thought/logprob_gap"]) < 1e-4  # on-policy
        assert row["time/weight_sync"] > 0 and row["time/rollout"] > 0 and row["time/learn"] > 0
    assert [r["policy/version"] for r in rows] == [0, 1, 2]
    assert_same_trajectory(rows, reference)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000003"
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "wandb ran offline, from the driver"
    log = (run_dir / "train.log").read_text()
    # model.cpu_allocator 'auto' with checkpointing: the actors started with Ray's jemalloc preloaded
    assert "2 learners (CPU allocator: jemalloc, freed memory kept for reuse), 1 rollout workers" in log, log


def test_weights_after_a_sync_equal_the_learners_exactly(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    config = load_config(TINY, [*RAY_ARGS, f"train.run_dir={tmp_path}", "cluster.weight_sync_chunk_mb=1"])
    ray.init(address=cluster.address, logging_level="WARNING")
    group = None
    try:
        group = ActorGroup(config)
        assert group.setup(resume_from=None) == 0
        stream = WindowStream(config.data, load_tokenizer(config.model.name), seed=0, world_size=2)
        thoughts = group.sample(next(stream.step_batches(1, 1)))
        group.learn(0, thoughts)  # one optimizer step
        before = ray.get(group.rollouts[0].state_dict.remote())
        chunks = group.publish_weights()
        assert len(chunks) >= 2, "whole tensors grouped into chunks of at least 1 MiB"
        wait_all(group.push_weights(version=1), 120, "load_weights")
        after = ray.get(group.rollouts[0].state_dict.remote())
        learner = group.on_learners("full_state_dict")[0]
        assert after.keys() == learner.keys()
        for name, tensor in learner.items():
            assert torch.equal(after[name], tensor), name
        assert any(not torch.equal(before[n], after[n]) for n in after), "the step changed the weights"
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()


def test_a_submitted_job_with_a_relative_run_dir_is_a_config_error(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what the Ray job supervisor sets for the driver
    assert main(["--config", str(TINY), "train.run_dir=runs/x", "cluster.learners=0", *RAY_ARGS[1:]]) == 2
    err = capsys.readouterr().err
    assert "train.run_dir: 'runs/x' is relative" in err and "cluster.learners" in err  # listed together
    assert not ray.is_initialized()


def test_asking_for_more_than_the_cluster_has_fails_fast_with_exit_2(cluster, tmp_path):
    start = time.monotonic()
    proc = ray_train(
        cluster,
        tmp_path / "run",
        "cluster.learners=8",
        "cluster.gpus_per_learner=1",
        "train.global_batch_size=8",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "needs 8 GPUs (8 learners x 1" in proc.stderr and "the cluster has 0 free" in proc.stderr
    assert "needs 9 CPUs" in proc.stderr  # every shortfall at once
    assert time.monotonic() - start < 90


def test_a_killed_rollout_actor_stops_the_run_with_its_name(cluster, tmp_path):
    proc = ray_train(cluster, tmp_path / "run", "train.steps=3", QSTAR_RL_KILL_AT="rollout_v1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rollout-0 died during sample" in proc.stderr
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1]


def test_a_killed_rollout_actor_restarts_from_the_last_checkpoint(cluster, reference, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["train.steps=4", "train.checkpoint_every=2", "cluster.max_restarts=1"]
    proc = ray_train(cluster, run_dir, *overrides, QSTAR_RL_KILL_AT="rollout_v2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "restart 1 of 1 from the last checkpoint" in (run_dir / "train.log").read_text()
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["cluster/restarts"] == 1
    assert_same_trajectory(rows, reference)  # as if never interrupted


def test_colocated_placement_trains_like_the_deepspeed_path(cluster, reference, tmp_path):
    checkpointing = "model.gradient_checkpointing=true"
    proc = ray_train(cluster, tmp_path / "run", "train.steps=2", "cluster.colocate=true", checkpointing, *EVAL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "colocated rollout" in (tmp_path / "run" / "train.log").read_text()
    rows = metrics(tmp_path / "run")
    assert_same_trajectory(rows, reference)
    for key in EVAL_KEYS:  # periodic evaluation on the 2 learner ranks equals the 1-rank deepspeed run's
        assert rows[1][key] == pytest.approx(reference[1][key], abs=1e-5, rel=1e-4), key


def test_async_rollout_is_at_most_one_version_stale(cluster, tmp_path):
    proc = ray_train(cluster, tmp_path / "run", "train.steps=3", "cluster.async_rollout=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(tmp_path / "run")
    assert [r["policy/staleness"] for r in rows] == [0, 1, 1]
    assert abs(rows[0]["thought/logprob_gap"]) < 1e-4
    assert abs(rows[1]["thought/logprob_gap"]) > 1e-4, "stale thoughts: rollout and learner log-probs differ"
    assert rows[0]["policy/is_weight_mean"] == 1.0 and rows[0]["policy/is_clipped_frac"] == 0.0  # on-policy
    assert all(r["policy/is_weight_mean"] != 1.0 for r in rows[1:]), "stale thoughts are importance-weighted"
    assert all(math.isfinite(r["loss/total"]) for r in rows)
    assert [r["policy/version"] for r in rows] == [0, 0, 1], "the version that sampled each step's thoughts"
