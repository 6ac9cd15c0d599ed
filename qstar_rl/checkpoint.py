"""Checkpoints: the engine's state plus the run state, never "latest" until completely written.

Layout under <run_dir>/checkpoints/:
    step_000010/            one checkpoint: DeepSpeed's files (or plain.pt), run_state_rank<r>.pt, config.yaml
    latest                  the name of the newest complete checkpoint, replaced atomically

A save writes the checkpoint folder, waits for every rank, and only then rank 0 replaces `latest`. A
crash or kill at any moment leaves `latest` naming the previous complete checkpoint. Older ones beyond
`train.keep_checkpoints` are deleted after the new `latest` is in place.
"""

import os
import random
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from qstar_rl.data import DataPosition, DataStats
from qstar_rl.engine import PlainEngine, barrier

LATEST = "latest"


@dataclass
class RunState:
    """Everything besides the engine that a resumed run needs to continue as if never interrupted."""

    step: int = 0
    """Optimizer steps completed (also the policy version)."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite gradient."""
    data: DataPosition = field(default_factory=DataPosition)
    """Where this rank's window stream stands."""
    data_stats: DataStats = field(default_factory=DataStats)
    """Bad-data counts so far."""
    torch_rng: torch.Tensor | None = None
    """torch's global CPU RNG state."""
    cuda_rng: torch.Tensor | None = None
    """This rank's CUDA RNG state, on GPUs."""
    python_rng: object = None
    """Python's `random` state."""


def capture_rngs(state: RunState) -> None:
    """Thought sampling needs none of these (it is seeded per window); anything else random does."""
    state.torch_rng = torch.get_rng_state()
    state.cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    state.python_rng = random.getstate()


def restore_rngs(state: RunState) -> None:
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state.cuda_rng)
    random.setstate(state.python_rng)


def fault(point: str, once_marker: Path | None = None) -> None:
    """Fault injection for tests: QSTAR_RL_KILL_AT=<point> makes this process kill itself (SIGKILL) there.
    Points: checkpoint_midway_<step> (engine state written, run state and marker not), saved_<step>,
    rollout_<step> (a Ray rollout actor about to sample that step). With `once_marker`, only the first
    process to get there dies (the marker file remembers), so that a restarted run can go on."""
    if os.environ.get("QSTAR_RL_KILL_AT") != point:
        return
    if once_marker is not None:
        if once_marker.exists():
            return
        once_marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)


def save(engine, run_dir: Path, state: RunState, config_dict: dict, rank: int, keep: int) -> Path:
    """Write checkpoint step_<N>; returns its folder. Every rank calls this."""
    root = run_dir / "checkpoints"
    tag = f"step_{state.step:06d}"
    folder = root / tag
    if rank == 0 and folder.exists():  # a partial leftover of a killed save of this same step
        shutil.rmtree(folder)
    barrier()
    if isinstance(engine, PlainEngine):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": engine.module.state_dict(),
                "optimizer": engine.optimizer.state_dict(),
                "scheduler": engine.lr_scheduler.state_dict(),
                "global_steps": engine.global_steps,
            },
            folder / "plain.pt",
        )
    else:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    fault(f"checkpoint_midway_{state.step}")
    torch.save(asdict_shallow(state), folder / f"run_state_rank{rank}.pt")
    if rank == 0:
        (folder / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    barrier()
    if rank == 0:
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)  # the commit point
        _prune(root, keep)
    barrier()
    fault(f"saved_{state.step}")
    return folder


def asdict_shallow(state: RunState) -> dict:
    out = {k: getattr(state, k) for k in state.__dataclass_fields__}
    out["data"], out["data_stats"] = asdict(state.data), asdict(state.data_stats)
    return out


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    latest = (root / LATEST).read_text().strip()
    for old in tags[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    marker = run_dir / "checkpoints" / LATEST
    if not marker.is_file():
        return None
    folder = marker.parent / marker.read_text().strip()
    return folder if folder.is_dir() else None


def load(engine, folder: Path, rank: int) -> RunState:
    """Restore the engine from checkpoint `folder` and return this rank's run state."""
    if isinstance(engine, PlainEngine):
        blob = torch.load(folder / "plain.pt", weights_only=False)
        engine.module.load_state_dict(blob["model"])
        engine.optimizer.load_state_dict(blob["optimizer"])
        engine.lr_scheduler.load_state_dict(blob["scheduler"])
        engine.global_steps = blob["global_steps"]
    else:
        engine.load_checkpoint(str(folder.parent), tag=folder.name)
    return load_run_state(folder, rank)


def load_run_state(folder: Path, rank: int = 0) -> RunState:
    """A rank's run state from checkpoint `folder`, without touching any engine."""
    raw = torch.load(folder / f"run_state_rank{rank}.pt", weights_only=False)
    raw["data"], raw["data_stats"] = DataPosition(**raw["data"]), DataStats(**raw["data_stats"])
    return RunState(**raw)
