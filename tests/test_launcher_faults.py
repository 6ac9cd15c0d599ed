"""Faults around a running job, through the real entry points: a second job on the same run directory, a rank
that stops answering, a launcher that dies, a disk that fills up during a save."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import ROOT, TINY, env, metrics, train

from qstar_rl.engine import free_port

pytestmark = pytest.mark.slow
TWO_RANKS = ["train.micro_batch_size=1", "train.steps=200", "train.report_windows=0", "train.thought_table_every=0"]
TWO_RANKS += ["wandb.mode=disabled"]


def launch_two_ranks(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """The deepspeed launcher with 2 CPU ranks, in the background; its output goes to run_dir.parent/job.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "qstar_rl.train"]
    cmd += ["--config", str(TINY), f"train.run_dir={run_dir}", *TWO_RANKS, *overrides]
    log = (run_dir.parent / "job.log").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)


def wait_for_step(run_dir: Path, rank: int, step: int, job: subprocess.Popen, timeout: float = 240) -> dict:
    """Rank `rank`'s heartbeat once it starts step `step` or later."""
    path = run_dir / ".ranks" / f"rank{rank}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, (run_dir.parent / "job.log").read_text()[-4000:]
        try:
            record = json.loads(path.read_text())
            if record["step"] >= step:
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} did not reach step {step}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def listening(pid: int) -> list[str]:
    """Local addresses (hex ip:port as in /proc/net/tcp*) of the TCP sockets process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                found.append(fields[1])
    return found


def is_loopback_hex(address: str) -> bool:
    """127.x.x.x (/proc/net/tcp: little-endian hex), ::1, or ::ffff:127.x.x.x."""
    ip = address.split(":")[0]
    if len(ip) == 8:
        return ip.endswith("7F")
    mapped_v4 = ip[:16] == "0" * 16 and ip[16:24] == "FFFF0000" and ip.endswith("7F")
    return ip == "00000000000000000000000001000000" or mapped_v4


ONE_PROCESS = """
import os, time
from qstar_rl.engine import init_distributed
init_distributed()
print("pid", os.getpid(), flush=True)
time.sleep(30)
"""


def test_local_runs_listen_on_loopback_only(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", ONE_PROCESS], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert any(line == f"pid {proc.pid}\n" for line in iter(proc.stdout.readline, ""))  # DeepSpeed prints first
        addresses = listening(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert all(is_loopback_hex(a) for a in addresses), addresses  # torch's TCP store would listen on 0.0.0.0


def test_a_running_job_locks_its_directory_and_a_rank_that_stops_answering_ends_it(tmp_path):
    run_dir = tmp_path / "run"
    job = launch_two_ranks(run_dir, "train.step_timeout_s=6", "train.checkpoint_every=2")
    try:
        rank0 = wait_for_step(run_dir, 0, 3, job)
        for pid in (rank0["pid"], json.loads((run_dir / ".ranks" / "rank1.json").read_text())["pid"]):
            addresses = listening(pid)
            assert addresses and all(is_loopback_hex(a) for a in addresses), addresses
        second = train(run_dir, check=False)  # another job on the same directory
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"run directory {run_dir} is in use by PID {rank0['pid']} on {rank0['host']}" in second.stderr

        rank1 = wait_for_step(run_dir, 1, 4, job)
        os.kill(rank1["pid"], signal.SIGSTOP)
        stopped = time.monotonic()
        job.wait(timeout=120)
        elapsed = time.monotonic() - stopped
    finally:
        job.kill()
    log = (tmp_path / "job.log").read_text()
    assert job.returncode != 0
    assert "a collective waited more than train.step_timeout_s (6 s): rank 1 (PID " in log, log[-4000:]
    assert f"(PID {rank1['pid']} on {rank1['host']}, killed)" in log
    assert elapsed < 6 + 20, elapsed  # the timeout, then the launcher's shutdown: not torch's 30 minutes
    assert not alive(rank1["pid"])

    # The lock died with the job; a restart that changes the method is refused, naming each change.
    proc = train(run_dir, *TWO_RANKS, "thought.length=5", "data.seq_len=20", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "thought.length: 3 -> 5" in proc.stderr and "data.seq_len: 24 -> 20" in proc.stderr
    assert "--allow-config-change" in proc.stderr
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3  # no row lost or repeated


def test_the_ranks_stop_within_seconds_when_the_launcher_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    job = launch_two_ranks(run_dir)
    try:
        ranks = [wait_for_step(run_dir, r, 2, job)["pid"] for r in (0, 1)]
        job.kill()  # SIGKILL of the `deepspeed` runner: launch.py and the ranks are orphaned
        killed = time.monotonic()
        while any(alive(pid) for pid in ranks) and time.monotonic() - killed < 30:
            time.sleep(0.2)
        elapsed = time.monotonic() - killed
    finally:
        job.kill()
    assert not any(alive(pid) for pid in ranks)
    assert elapsed < 10, elapsed
    assert "its launcher (PID " in (tmp_path / "job.log").read_text()
    assert "stopping so that a restart does not race it" in (run_dir / "train.log").read_text()


DISK_FULL = """
set -e
mount -t tmpfs -o size={size}m qstar-test {mnt}
set +e
"$@" > {log1} 2>&1; echo $? > {out}/rc1
ls {mnt}/run/checkpoints > {out}/after_failure
mount -o remount,size=400m {mnt}
"$@" > {log2} 2>&1; echo $? > {out}/rc2
cp -a {mnt}/run {out}/run
"""


def test_a_full_disk_during_a_save_is_named_and_the_next_start_resumes(tmp_path):
    """A real full filesystem: a tmpfs that holds one checkpoint of the tiny model (42 MiB) but not two, in a
    private mount namespace (unshare), then grown to let the same command resume."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) for a small tmpfs")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    script = DISK_FULL.format(size=70, mnt=mnt, out=out, log1=out / "first.log", log2=out / "second.log")
    cmd = [sys.executable, "-m", "qstar_rl.train", "--config", str(TINY), f"train.run_dir={mnt / 'run'}"]
    cmd += ["train.report_windows=0", "train.thought_table_every=0", "wandb.mode=disabled"]
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *cmd], cwd=ROOT, env=env(), timeout=600)
    assert proc.returncode == 0
    first = (out / "first.log").read_text()
    assert (out / "rc1").read_text().strip() == "1", first[-4000:]
    assert "Traceback" not in first
    assert f"could not write checkpoint {mnt / 'run' / 'checkpoints' / 'step_000004'}" in first
    assert f"free space on {mnt / 'run' / 'checkpoints'}:" in first and "a checkpoint of this run takes 4" in first
    assert "the last complete checkpoint, step_000002, is untouched" in first
    assert "step_000004" not in (out / "after_failure").read_text().split()  # the partial folder is gone
    second = (out / "second.log").read_text()
    assert (out / "rc2").read_text().strip() == "0", second[-4000:]
    assert "resumed from" in second and "(step 2)" in second
    assert [r["step"] for r in metrics(out / "run")] == [1, 2, 3, 4]


def test_an_unreachable_wandb_falls_back_to_offline_and_says_how_to_sync(tmp_path, monkeypatch, caplog):
    from qstar_rl.config import Config
    from qstar_rl.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key: wandb.mode auto goes online
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    config = Config()
    config.wandb.mode = "auto"
    started = time.monotonic()
    logger = MetricsLogger(config, tmp_path, rank=0)
    logger.log_step(1, {"reward/mean": -1.0})
    logger.close()
    assert time.monotonic() - started < 60
    assert "wandb is unreachable" in caplog.text and "logging offline into" in caplog.text
    assert f"wandb sync {tmp_path / 'wandb' / 'offline-run-*'}" in caplog.text
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
