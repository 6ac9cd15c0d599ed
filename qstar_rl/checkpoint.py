"""Checkpoints: the engine's state plus the run state, complete only once its manifest is written.

Layout under <run_dir>/checkpoints/:
    step_000010/            one checkpoint: DeepSpeed's files (or plain.pt), run_state_rank<r>.pt, config.yaml,
                            and manifest.json (every other file's size and sha256, the world size that wrote it)
    latest                  the name of the newest complete checkpoint (for DeepSpeed's tools and people)

A save writes the checkpoint folder, waits for every rank, hashes the files (each rank a share), and only then
rank 0 writes manifest.json (atomically: the commit point) and replaces `latest`. A crash or kill at any moment
leaves a folder without a manifest, which a start ignores. A start resumes from the newest folder whose files
all match their manifest (`find_resumable`), naming every newer one that does not; `latest` is only a hint.
Rotation (`train.keep_checkpoints`) runs after the commit and never deletes the newest complete checkpoint.
"""

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from qstar_rl.data import DataPosition, DataStats
from qstar_rl.engine import barrier, is_collective_timeout
from qstar_rl.faults import kill_at

LATEST = "latest"
MANIFEST = "manifest.json"
STEP_FOLDER = re.compile(r"step_\d{6,}")
log = logging.getLogger("qstar_rl")


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


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, ...); the previous complete one is untouched."""


def save(engine, run_dir: Path, state: RunState, config_dict: dict, rank: int, keep: int) -> Path:
    """Write checkpoint step_<N>; returns its folder. Every rank calls this. Raises CheckpointWriteError."""
    root = run_dir / "checkpoints"
    tag = f"step_{state.step:06d}"
    folder = root / tag
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:
        if folder.exists():  # a partial or damaged leftover of this same step
            shutil.rmtree(folder)
        _make_room(root, keep)
    barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)  # DeepSpeed's, or PlainEngine's plain.pt
        kill_at(f"checkpoint_midway_{state.step}")
        torch.save(asdict_shallow(state), folder / f"run_state_rank{rank}.pt")
        if rank == 0:
            (folder / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
        barrier()
        _write_manifest(folder, state.step, rank, world)  # the commit point
        if rank == 0:
            _write_atomically(root / LATEST, tag)
    except (OSError, RuntimeError) as err:
        if is_collective_timeout(err):  # another rank stopped answering: not a write failure
            raise
        raise CheckpointWriteError(_write_failure(folder, err, rank)) from err
    if rank == 0:
        _prune(root, keep, state.step)
    barrier()
    kill_at(f"saved_{state.step}")
    return folder


def asdict_shallow(state: RunState) -> dict:
    out = {k: getattr(state, k) for k in state.__dataclass_fields__}
    out["data"], out["data_stats"] = asdict(state.data), asdict(state.data_stats)
    return out


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(folder: Path, step: int, rank: int, world: int) -> None:
    """Every rank hashes a share of the folder's files; rank 0 writes manifest.json with all of them."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    mine = {n: {"size": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names[rank::world]}
    shares = [mine]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, mine)
    if rank == 0:
        files = {name: entry for share in shares for name, entry in share.items()}
        manifest = {"format": 1, "step": step, "world_size": world, "files": dict(sorted(files.items()))}
        _write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1))


def _write_failure(folder: Path, err: BaseException, rank: int) -> str:
    """What a failed save says: the error, free space, what a checkpoint needs, and what is still intact.
    Rank 0 removes the partial folder (a start would ignore it anyway, but it holds space)."""
    root = folder.parent
    previous = [f for f in _step_folders(root) if f != folder and (f / MANIFEST).is_file()]
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    free = shutil.disk_usage(root).free
    size = _manifest_bytes(previous[-1]) if previous else None
    lines = [f"could not write checkpoint {folder}: {err}"]
    need = f"; a checkpoint of this run takes {_gib(size)}" if size else ""
    lines.append(f"free space on {root}: {_gib(free)}{need} (saving needs room for train.keep_checkpoints + 1)")
    if previous:
        lines.append(
            f"the last complete checkpoint, {previous[-1].name}, is untouched: make room, then run the same command "
            "again to resume from it"
        )
    return "\n  ".join(lines)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB"


def _manifest_bytes(folder: Path) -> int:
    try:
        return sum(entry["size"] for entry in json.loads((folder / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _step_folders(root: Path) -> list[Path]:
    """step_<N> folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_FOLDER.fullmatch(p.name)), key=lambda p: p.name)


def _make_room(root: Path, keep: int) -> None:
    """When the disk cannot hold one more checkpoint, delete now the complete ones that rotation would delete
    after this save anyway, always keeping the newest."""
    complete = [f for f in _step_folders(root) if (f / MANIFEST).is_file()]
    if not complete:
        return
    need = _manifest_bytes(complete[-1])
    if shutil.disk_usage(root).free >= 1.05 * need:
        return
    doomed = complete[: -max(keep - 1, 1)]
    for old in doomed:
        log.warning("disk nearly full: deleting %s before this save instead of after it", old)
        shutil.rmtree(old, ignore_errors=True)
    free = shutil.disk_usage(root).free
    if free < 1.05 * need:
        log.warning("%s has %s free; the last checkpoint took %s: this save may not fit", root, _gib(free), _gib(need))


def _prune(root: Path, keep: int, newest: int) -> None:
    """Keep the `keep` newest complete checkpoints up to step `newest`; delete every older folder (complete,
    partial or damaged). Folders beyond `newest` (left by a run that fell back past them) stay until overwritten."""
    older = [f for f in _step_folders(root) if int(f.name[5:]) <= newest]
    kept = [f for f in older if (f / MANIFEST).is_file()][-keep:]
    for folder in older:
        if folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)


def verify(folder: Path) -> list[str]:
    """What is wrong with checkpoint `folder` against its manifest (empty: intact). Reads every byte."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        return [f"no {MANIFEST}: a save that never finished"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{MANIFEST} is unreadable ({type(err).__name__})"]
    problems = []
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
        elif _sha256(path) != digest:
            problems.append(f"{name} does not match its checksum")
    return problems


@dataclass
class Resumable:
    """What a start can resume from (`find_resumable`)."""

    folder: Path | None
    """The newest intact checkpoint, or None."""
    passed_over: dict[str, list[str]] = field(default_factory=dict)
    """Newer checkpoint folders (or `latest`) that are unusable, with what is wrong with each."""
    incomplete: list[str] = field(default_factory=list)
    """Folders of saves that never finished (no manifest): ignored."""
    world_size: int | None = None
    """How many ranks wrote `folder` (None for checkpoints written before manifests)."""

    @property
    def had_checkpoints(self) -> bool:
        return self.folder is not None or bool(self.passed_over)


def find_resumable(run_dir: Path) -> Resumable:
    """The newest checkpoint of `run_dir` whose files match its manifest. A folder without a manifest is a save
    that never finished, unless `latest` names it (written before manifests existed: used unverified)."""
    root = run_dir / "checkpoints"
    latest, latest_problem = _read_latest(root)
    found = Resumable(None)
    if latest_problem:
        found.passed_over[LATEST] = [latest_problem]
    for folder in reversed(_step_folders(root)):
        if not (folder / MANIFEST).exists():
            if folder.name == latest:
                log.warning("%s has no manifest (written by an older qstar-rl): resuming from it unverified", folder)
                found.folder = folder
                found.world_size = len(list(folder.glob("*optim_states.pt"))) or 1
                return found
            found.incomplete.append(folder.name)
            continue
        problems = verify(folder)
        if problems:
            found.passed_over[folder.name] = problems
            continue
        found.folder = folder
        found.world_size = json.loads((folder / MANIFEST).read_text()).get("world_size")
        return found
    return found


def _read_latest(root: Path) -> tuple[str | None, str | None]:
    """(`latest`'s folder name, what is wrong with it); both None when there is no `latest`."""
    marker = root / LATEST
    if not marker.exists():
        return None, None
    try:
        name = marker.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, "unreadable (not a text file)"
    if not STEP_FOLDER.fullmatch(name):
        return None, f"holds {name[:40]!r}, not a checkpoint name like step_000010"
    if not (root / name).is_dir():
        return None, f"names {name}, which does not exist"
    return name, None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run directory, or None (for tools that read checkpoints)."""
    return find_resumable(run_dir).folder


def load(engine, folder: Path, rank: int, other_world_size: bool = False) -> RunState:
    """Restore the engine from checkpoint `folder` and return this rank's run state. `other_world_size`: the
    checkpoint was written by another number of ranks; it is converted to DeepSpeed's universal format first
    (the engine must have been built with load_universal) and ranks it did not have take rank 0's run state
    (the data position is global; thought sampling is seeded per window, not by these RNG states)."""
    if other_world_size:
        universal = _universal_copy(folder, rank)
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
        engine.load_checkpoint(str(universal.parent), tag=universal.name)
        # DeepSpeed's universal loader gives every param group the first group's hyperparameters (ours differ:
        # meta-token lr, no decay on norms): put them back, with the learning rates the restored scheduler set.
        for group, own, lr in zip(engine.optimizer.param_groups, hyper, engine.lr_scheduler.get_last_lr(), strict=True):
            group.update({**own, "lr": lr})
        # It also hands all groups one shared `step` tensor, which a fused AdamW then advances once per group.
        for param_state in engine.optimizer.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
        barrier()
        if rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
        own = folder / f"run_state_rank{rank}.pt"
        return load_run_state(folder, rank if own.is_file() else 0)
    engine.load_checkpoint(str(folder.parent), tag=folder.name)
    return load_run_state(folder, rank)


def _universal_copy(folder: Path, rank: int) -> Path:
    """Rank 0 converts checkpoint `folder` with DeepSpeed's ds_to_universal into a sibling folder that a start
    never mistakes for a checkpoint (universal-step_<N>/, deleted after loading); every rank waits for it."""
    target = folder.parent / f"universal-{folder.name}"
    if rank == 0:
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(target, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(folder),
            output_folder=str(target),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal(args)
        (folder.parent / "latest_universal").unlink(missing_ok=True)  # the converter's side file
    barrier()
    return target


def load_run_state(folder: Path, rank: int = 0) -> RunState:
    """A rank's run state from checkpoint `folder`, without touching any engine. Loaded with weights_only: a
    crafted pickle is refused, never run."""
    path = folder / f"run_state_rank{rank}.pt"
    try:
        raw = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointReadError(f"{path}: refused, it holds more than tensors and plain data ({err})") from err
    raw["data"], raw["data_stats"] = DataPosition(**raw["data"]), DataStats(**raw["data_stats"])
    return RunState(**raw)


class CheckpointReadError(Exception):
    """A checkpoint file that must not or cannot be loaded."""
