"""Run directories in process: checkpoint manifests and the choice of what to resume from, damage of every kind,
rotation, the lock, history moved aside, config changes, torn metrics, heartbeats, refused pickles. The same
behaviours through the real entry points (DeepSpeed, the launcher, a full disk) are in test_train.py."""

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from qstar_rl import checkpoint, rundir
from qstar_rl.checkpoint import CheckpointReadError, RunState, find_resumable
from qstar_rl.config import Config, ThoughtConfig, config_to_dict
from qstar_rl.engine import PlainEngine
from qstar_rl.loading import tiny_lm
from qstar_rl.metrics import _drop_rows_after, valid_wandb_run_id
from qstar_rl.model import ThinkingLM
from qstar_rl.rundir import RunDirError


def plain_engine() -> PlainEngine:
    model = ThinkingLM(tiny_lm("llama"), ThoughtConfig(2, 2, 1, init_token_id=5))
    return PlainEngine(model, Config())


def saved_run(tmp_path: Path, steps=(2, 4), keep: int = 2) -> Path:
    """A run directory with real (PlainEngine) checkpoints at `steps`."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    engine, config = plain_engine(), config_to_dict(Config())
    for step in steps:
        engine.global_steps = step
        checkpoint.save(engine, run_dir, RunState(step=step), config, rank=0, keep=keep)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, steps[-1] + 1)))
    return run_dir


def flip_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def test_a_save_writes_a_manifest_that_verifies(tmp_path):
    run_dir = saved_run(tmp_path)
    folder = run_dir / "checkpoints" / "step_000004"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["step"] == 4
    assert set(manifest["files"]) == {"plain.pt", "run_state_rank0.pt", "config.yaml"}
    assert checkpoint.verify(folder) == []
    found = find_resumable(run_dir)
    assert found.folder == folder and not found.passed_over and found.world_size == 1


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: flip_byte(f / "plain.pt"), "plain.pt does not match its checksum"),
        (lambda f: os.truncate(f / "plain.pt", 10), "plain.pt has 10 bytes, the manifest says"),
        (lambda f: (f / "run_state_rank0.pt").unlink(), "run_state_rank0.pt is missing"),
        (lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json is unreadable"),
    ],
)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage, expected):
    run_dir = saved_run(tmp_path)
    damage(run_dir / "checkpoints" / "step_000004")
    found = find_resumable(run_dir)
    assert found.folder == run_dir / "checkpoints" / "step_000002"
    assert expected in found.passed_over["step_000004"][0]
    plan = rundir.plan_start(run_dir, True, config_to_dict(Config()), False, 1)
    assert plan.resume_from == str(found.folder)
    assert any("step_000004 is damaged" in note and expected in note for note in plan.notes)


@pytest.mark.parametrize(
    "latest, expected",
    [
        (b"garbage", "holds 'garbage'"),
        (b"\x80\x81\xff", "unreadable"),
        (b"..", "holds '..'"),
        (b"", "holds ''"),
        (b"step_000009", "names step_000009, which does not exist"),
    ],
)
def test_a_bad_latest_marker_is_named_and_ignored(tmp_path, latest, expected):
    run_dir = saved_run(tmp_path)
    (run_dir / "checkpoints" / "latest").write_bytes(latest)
    found = find_resumable(run_dir)
    assert found.folder == run_dir / "checkpoints" / "step_000004"  # the manifests decide, not `latest`
    assert expected in found.passed_over["latest"][0]


def test_a_save_that_never_finished_is_ignored(tmp_path):
    run_dir = saved_run(tmp_path)
    partial = run_dir / "checkpoints" / "step_000006"
    partial.mkdir()
    (partial / "plain.pt").write_bytes(b"half")  # no manifest: killed while saving
    found = find_resumable(run_dir)
    assert found.folder == run_dir / "checkpoints" / "step_000004"
    assert found.incomplete == ["step_000006"] and not found.passed_over


def test_a_checkpoint_from_before_manifests_is_used_when_latest_names_it(tmp_path):
    run_dir = saved_run(tmp_path, steps=(2,))
    (run_dir / "checkpoints" / "step_000002" / "manifest.json").unlink()
    assert find_resumable(run_dir).folder == run_dir / "checkpoints" / "step_000002"
    (run_dir / "checkpoints" / "latest").unlink()  # without `latest` it is a save that never finished
    assert find_resumable(run_dir).folder is None


def test_no_intact_checkpoint_is_exit_2_listing_each_and_nothing_moves(tmp_path):
    run_dir = saved_run(tmp_path)
    os.truncate(run_dir / "checkpoints" / "step_000004" / "plain.pt", 3)
    flip_byte(run_dir / "checkpoints" / "step_000002" / "run_state_rank0.pt")
    (run_dir / "checkpoints" / "latest").write_text("nonsense")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(RunDirError) as err:
        rundir.plan_start(run_dir, True, config_to_dict(Config()), False, 1)
    message = str(err.value)
    assert "has checkpoints but none is intact" in message and "--resume never" in message
    assert "step_000004 is damaged: plain.pt has 3 bytes" in message
    assert "step_000002 is damaged: run_state_rank0.pt does not match its checksum" in message
    assert "latest is unusable" in message
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing trained, moved or deleted


def test_starting_over_moves_the_history_aside(tmp_path):
    run_dir = saved_run(tmp_path)
    metrics = (run_dir / "metrics.jsonl").read_text()
    plan = rundir.plan_start(run_dir, False, config_to_dict(Config()), False, 1)
    assert plan.resume_from is None
    (previous,) = run_dir.glob("previous-*")
    assert (previous / "metrics.jsonl").read_text() == metrics
    assert checkpoint.verify(previous / "checkpoints" / "step_000004") == []
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    assert any(str(previous) in note for note in plan.notes)


def test_rotation_keeps_the_newest_complete_checkpoints_and_drops_older_leftovers(tmp_path):
    run_dir = saved_run(tmp_path, steps=(2, 4, 6, 8), keep=2)
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert names == ["step_000006", "step_000008"]
    # A run that fell back past a damaged step_000008 to step_000006 saves step_000007: the newer damaged folder
    # stays until overwritten, the older complete ones beyond `keep` go.
    flip_byte(run_dir / "checkpoints" / "step_000008" / "plain.pt")
    engine = plain_engine()
    checkpoint.save(engine, run_dir, RunState(step=7), config_to_dict(Config()), rank=0, keep=1)
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert names == ["step_000007", "step_000008"]
    assert find_resumable(run_dir).folder.name == "step_000007"


def test_a_method_change_on_resume_is_refused_and_others_are_listed(tmp_path):
    run_dir = saved_run(tmp_path)
    changed = Config()
    changed.thought.length, changed.data.seq_len, changed.optim.lr = 5, 33, 0.5
    with pytest.raises(RunDirError) as err:
        rundir.plan_start(run_dir, True, config_to_dict(changed), False, 1)
    default = Config()
    assert f"thought.length: {default.thought.length} -> 5" in str(err.value)
    assert f"data.seq_len: {default.data.seq_len} -> 33" in str(err.value) and "--allow-config-change" in str(err.value)
    assert "optim.lr" not in str(err.value)  # only the method keys are refused
    plan = rundir.plan_start(run_dir, True, config_to_dict(changed), True, 1)
    assert f"config changed since step_000004: optim.lr: {default.optim.lr} -> 0.5" in plan.notes
    assert any("thought.length" in n for n in plan.notes)
    attempts = sorted((run_dir / "attempts").glob("*.yaml"))
    assert [a.name for a in attempts] == ["001.yaml"]  # the refused attempt wrote nothing
    assert yaml.safe_load(attempts[0].read_text())["thought"]["length"] == 5
    assert "resumed from step_000004" in attempts[0].read_text().splitlines()[0]


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from qstar_rl import rundir
rundir.lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_job_on_a_locked_run_directory_is_refused_until_the_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError) as err:
            rundir.lock(tmp_path)
        assert f"in use by PID {holder.pid} on " in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    fd = rundir.lock(tmp_path)  # the kernel released the dead holder's lock
    assert f"PID {os.getpid()}" in (tmp_path / ".lock").read_text()
    os.close(fd)


def test_torn_metric_lines_are_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("\n".join(rows) + '\n{"step": 4, "lo')  # power loss in the middle of a line
    _drop_rows_after(path, 3)
    assert path.read_text().splitlines() == rows
    assert "dropped 1 line(s) that are not JSON" in caplog.text


@pytest.mark.parametrize("text, valid", [("", False), ("\n", False), ("ab12cd34", True), ("../x", False)])
def test_wandb_run_ids_are_checked(text, valid):
    assert valid_wandb_run_id(text.strip()) is valid


def test_heartbeats_name_the_rank_that_fell_behind(tmp_path):
    zero, one = rundir.Heartbeats(tmp_path, 0), rundir.Heartbeats(tmp_path, 1)
    one.beat(3, "starting")
    time.sleep(0.01)
    zero.beat(4, "starting")
    assert zero.laggard(2)[0] == 1 and zero.laggard(2)[1]["step"] == 3
    assert rundir.Heartbeats(tmp_path, 0).laggard(3) == (2, None)  # rank 2 never reported


LAUNCHED = """
import logging, os, sys, time
from pathlib import Path
from qstar_rl.rundir import watch_launcher
logging.basicConfig(stream=sys.stderr)
stop_if_launcher_gone = watch_launcher(0, interval_s=3600)  # the thread sleeps: only the direct call can act
folder = Path(sys.argv[1])
(folder / "ready").write_text(str(os.getpid()))
while not (folder / "go").exists():
    time.sleep(0.05)
stop_if_launcher_gone()
(folder / "survived").touch()
"""
# argv[1] names a launcher: "deepspeed" among a process's first arguments is what the check looks for
LAUNCHER = """
import subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[2], sys.argv[3]], stderr=open(sys.argv[4], "w"))
"""


def test_a_rank_whose_launcher_died_stops_when_it_checks(tmp_path):
    rundir.watch_launcher(0)()  # pytest is no launcher: the check does nothing
    log = tmp_path / "rank.log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, "deepspeed", LAUNCHED, str(tmp_path), str(log)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        rank = int((tmp_path / "ready").read_text())
        launcher.kill()
        launcher.wait()  # SIGKILL takes effect asynchronously: the rank must not check before the launcher is gone
        (tmp_path / "go").touch()
        while rundir._process(rank) is not None and time.monotonic() < deadline:  # None: gone or a zombie
            time.sleep(0.05)
    finally:
        launcher.kill()
        launcher.wait()
    assert not (tmp_path / "survived").exists()
    assert f"rank 0: its launcher (PID {launcher.pid}) is gone" in log.read_text()


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["QSTAR_TEST_MARKER"]),))


def test_a_crafted_run_state_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "payload_ran"
    monkeypatch.setenv("QSTAR_TEST_MARKER", str(marker))
    folder = tmp_path / "step_000002"
    folder.mkdir()
    with (folder / "run_state_rank0.pt").open("wb") as f:
        pickle.dump({"step": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointReadError, match=r"run_state_rank0\.pt: refused"):
        checkpoint.load_run_state(folder)
    assert not marker.exists()
    torch.save(checkpoint.asdict_shallow(RunState(step=5)), folder / "run_state_rank0.pt")
    assert checkpoint.load_run_state(folder).step == 5  # a genuine one loads with weights_only


def test_a_plain_engine_checkpoint_resumes_to_the_same_next_step(tmp_path):
    """PlainEngine behind checkpoint.save / load (DeepSpeed's save_checkpoint / load_checkpoint signatures): the
    restored weights, AdamW moments and schedule take exactly the step the original takes."""
    from conftest import padded_batch

    torch.manual_seed(0)
    engine = plain_engine()
    ids, mask = padded_batch(seq_len=12, lengths=(12, 9), seed=0)

    def step(e: PlainEngine) -> None:
        out = e(ids, None, mask)
        loss = -out.base_logprobs[out.valid].mean()
        e.backward(loss)
        e.step()

    step(engine)
    run_dir = tmp_path / "run"
    config = config_to_dict(Config())
    checkpoint.save(engine, run_dir, RunState(step=1), config, rank=0, keep=1)
    torch.manual_seed(1)
    resumed = plain_engine()  # other initial weights: everything must come from the checkpoint
    state = checkpoint.load(resumed, find_resumable(run_dir).folder, rank=0)
    assert state.step == 1 and resumed.global_steps == engine.global_steps == 1
    step(engine)
    step(resumed)
    for (name, a), b in zip(engine.module.state_dict().items(), resumed.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
