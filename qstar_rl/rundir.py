"""A run directory's life: one job at a time, what a start resumes from, nothing deleted, nothing left hanging.

- `lock`: an advisory lock (flock on <run_dir>/.lock, released by the kernel when the holder dies), taken by the
  launcher's rank 0 or the Ray driver; a second job on the directory exits 2 naming the holder's PID and host.
- `plan_start`: resume from the newest intact checkpoint (checkpoint.find_resumable), naming the damaged ones;
  exit 2 when checkpoints exist but none is intact; list config changes key by key and refuse the ones that
  change the method without --allow-config-change; move an old history aside (previous-<time>/) before a
  start from step 0; keep each attempt's resolved config (attempts/NNN.yaml).
- `watch_launcher`: a rank started by the deepspeed launcher (or torchrun) stops within seconds when that
  launcher dies, so a restart never races ranks left training unsupervised.
- `Heartbeats`: each rank records its last step, so that a collective timeout (train.step_timeout_s) names the
  rank that stopped answering.
"""

import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qstar_rl.checkpoint import LATEST, find_resumable

log = logging.getLogger("qstar_rl")

LOCK_FILE = ".lock"
HISTORY = ("metrics.jsonl", "thoughts.jsonl", "checkpoints", "config.yaml", "train.log", "wandb", "wandb_run_id")
"""What a run leaves in its directory (besides report/ and attempts/, which go aside with it)."""
METHOD_KEYS = (
    "model.name",
    "data.source",
    "data.seq_len",
    "thought.num_thoughts",
    "thought.length",
    "thought.talk_length",
    "loss.objective",
    "train.seed",
)
"""Keys whose change on resume makes a different experiment (T, R, M, K, the model, the data, the seed): a
resume that changes them needs --allow-config-change."""


class RunDirError(Exception):
    """The run directory cannot be used as asked (exit code 2); the message says why and what to do."""


@dataclass
class StartPlan:
    """What a start does, decided once (rank 0 / the Ray driver) and shared with every rank."""

    resume_from: str | None = None
    """Checkpoint folder to resume from, or None to start at step 0."""
    written_by_world_size: int | None = None
    """Ranks that wrote `resume_from` (None: unknown, a checkpoint older than manifests)."""
    notes: list[str] = field(default_factory=list)
    """Warnings to log once logging is up (damaged checkpoints passed over, config changes, history moved)."""


def lock(run_dir: Path) -> int:
    """Take the run directory's lock for this process's lifetime; returns the open file descriptor (keep it).
    Raises RunDirError naming the holder when another job has it."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "an unknown process"
        os.close(fd)
        raise RunDirError(
            f"run directory {run_dir} is in use by {holder}: stop that job first (or wait for it), or choose another "
            "train.run_dir"
        ) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()} (since {started})\n".encode(), 0)
    return fd


def plan_start(run_dir: Path, resume: bool, config_dict: dict, allow_config_change: bool, world: int) -> StartPlan:
    """Decide where a start begins (see the module docstring); writes config.yaml and attempts/NNN.yaml.
    Raises RunDirError for a directory with checkpoints but none intact, or a refused config change."""
    plan = StartPlan()
    found = find_resumable(run_dir) if resume else None
    if found is not None:
        for name, problems in found.passed_over.items():
            what = f"checkpoints/{name}" + (" is unusable" if name == LATEST else " is damaged")
            plan.notes.append(f"{what}: {'; '.join(problems)}")
        if found.folder is None and found.had_checkpoints:
            listing = "\n  ".join(plan.notes)
            raise RunDirError(
                f"run directory {run_dir} has checkpoints but none is intact:\n  {listing}\n"
                "Restore them, or start over with --resume never (the old history is then moved aside to "
                f"{run_dir}/previous-<time>/, nothing is deleted)."
            )
    if found is not None and found.folder is not None:
        plan.resume_from = str(found.folder)
        plan.written_by_world_size = found.world_size
        if found.passed_over:
            plan.notes.append(f"falling back to {found.folder.name}, the newest intact checkpoint")
        plan.notes += _config_changes(found.folder / "config.yaml", config_dict, allow_config_change)
    else:
        moved = _move_history_aside(run_dir)
        if moved:
            plan.notes.append(f"starting from step 0: the previous run's files are now in {moved}")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    _record_attempt(run_dir, config_dict, plan)
    return plan


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_changes(old_path: Path, new: dict, allow: bool) -> list[str]:
    """One note per key that differs from the config that wrote the checkpoint; RunDirError if a method key
    changed and `allow` is False."""
    try:
        old = yaml.safe_load(old_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return [f"{old_path} is unreadable: config changes cannot be listed"]
    before, after = _flatten(old), _flatten(new)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, "<unset>") != after.get(k, "<unset>"))
    lines = [f"{k}: {before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r}" for k in changed]
    refused = [line for k, line in zip(changed, lines, strict=True) if k in METHOD_KEYS]
    if refused and not allow:
        raise RunDirError(
            f"resuming from {old_path.parent} with a config that changes the method:\n  "
            + "\n  ".join(refused)
            + "\nUse the old values, start a new train.run_dir, or pass --allow-config-change to continue anyway."
        )
    return [f"config changed since {old_path.parent.name}: {line}" for line in lines]


def _move_history_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's files into previous-<time>/ (a start from step 0 never deletes a history)."""
    present = [run_dir / name for name in (*HISTORY, "report", "attempts") if (run_dir / name).exists()]
    if not any(p.name in ("metrics.jsonl", "checkpoints") for p in present):
        return None
    target = run_dir / time.strftime("previous-%Y%m%dT%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "x")
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    return target


def _record_attempt(run_dir: Path, config_dict: dict, plan: StartPlan) -> None:
    attempts = run_dir / "attempts"
    attempts.mkdir(exist_ok=True)
    number = 1 + sum(1 for p in attempts.glob("*.yaml"))
    header = (
        f"# attempt {number}: {time.strftime('%Y-%m-%d %H:%M:%S')}, {socket.gethostname()}, "
        f"{'resumed from ' + Path(plan.resume_from).name if plan.resume_from else 'from step 0'}\n"
        f"# command: {' '.join(sys.argv)}\n"
    )
    (attempts / f"{number:03d}.yaml").write_text(header + yaml.safe_dump(config_dict, sort_keys=False))


LAUNCHERS = ("deepspeed", "deepspeed.launcher.launch", "deepspeed.launcher.runner", "torchrun", "torch.distributed.run")


def _process(pid: int) -> tuple[int, str] | None:
    """(parent PID, start time) of a live process, from /proc; None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (None if fields[0] == "Z" else (int(fields[1]), fields[19])) if fields else None


def _is_launcher(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    return any(Path(arg).name in LAUNCHERS or arg in LAUNCHERS for arg in argv[:4])


def launcher_ancestors() -> list[tuple[int, str]]:
    """(PID, start time) of this process's launcher processes (the deepspeed runner and launch.py, or torchrun):
    the chain of ancestors that are launchers, from the parent up."""
    chain, pid = [], os.getppid()
    while pid > 1 and _is_launcher(pid):
        info = _process(pid)
        if info is None:
            break
        chain.append((pid, info[1]))
        pid = info[0]
    return chain


def watch_launcher(rank: int, interval_s: float = 1.0) -> Callable[[], None]:
    """When started by a launcher, a daemon thread ends this process (exit 1) within `interval_s` of any launcher
    process dying. Returns that check (a no-op without a launcher) for the rank to call itself when a collective
    fails: a peer that stopped because the launcher died is not a rank that stopped answering. Checkpoints stay
    safe: an unfinished save has no manifest."""
    chain = launcher_ancestors()

    def stop_if_launcher_gone() -> None:
        for pid, started in chain:
            info = _process(pid)
            if info is None or info[1] != started:
                log.error(
                    "rank %d: its launcher (PID %d) is gone; stopping so that a restart does not race it", rank, pid
                )
                logging.shutdown()
                os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            stop_if_launcher_gone()

    if chain:
        threading.Thread(target=watch, name="qstar-launcher-watch", daemon=True).start()
    return stop_if_launcher_gone


class Heartbeats:
    """Each rank's last completed step and its time, as files under <run_dir>/.ranks/ (shared storage on a
    multi-node run): what a collective timeout reads to name the rank that stopped answering."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.folder = run_dir / ".ranks"
        self.folder.mkdir(exist_ok=True)
        self.rank = rank

    def beat(self, step: int, phase: str) -> None:
        record = {"step": step, "phase": phase, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
        tmp = self.folder / f".rank{self.rank}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.folder / f"rank{self.rank}.json")

    def laggard(self, world: int) -> tuple[int, dict | None]:
        """(rank, its last record) of the other rank furthest behind: lowest step, then heard from least
        recently; a rank never heard from comes first (record None)."""
        records = {}
        for r in range(world):
            try:
                records[r] = json.loads((self.folder / f"rank{r}.json").read_text())
            except (OSError, ValueError):
                if r != self.rank:
                    return r, None
        others = [r for r in records if r != self.rank] or [self.rank]
        r = min(others, key=lambda k: (records[k]["step"], records[k]["time"]))
        return r, records[r]

    def stop_laggard(self, world: int) -> str:
        """Name the rank that stopped answering ('rank 1 (PID 123 on host) last answered 24 s ago, starting step
        3') and, when it runs on this host, kill it: a stopped process would otherwise hold the launcher's
        shutdown for its grace period."""
        r, rec = self.laggard(world)
        if rec is None:
            return f"rank {r} (never reported a step)"
        where = f"PID {rec['pid']} on {rec['host']}"
        if rec["host"] == socket.gethostname() and _is_qstar_rank(rec["pid"]):
            os.kill(rec["pid"], signal.SIGKILL)
            where += ", killed"
        ago = time.time() - rec["time"]
        return f"rank {r} ({where}) last answered {ago:.0f} s ago, {rec['phase']} step {rec['step']}"


def _is_qstar_rank(pid: int) -> bool:
    try:
        return b"qstar_rl" in Path(f"/proc/{pid}/cmdline").read_bytes() and pid != os.getpid()
    except OSError:
        return False
