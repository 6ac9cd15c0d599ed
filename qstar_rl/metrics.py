"""Metrics: one JSON line per optimizer step in metrics.jsonl, the same keys to wandb, a progress bar.

Only rank 0 logs. wandb: mode 'auto' runs online when an API key is configured (WANDB_API_KEY or a netrc
entry for the wandb host) and offline otherwise; every wandb file (run, cache, config, artifacts) lives
inside the run directory, nothing under ~. Offline runs can be uploaded later with `wandb sync`.
"""

import json
import math
import netrc
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from qstar_rl.config import Config, config_to_dict

THOUGHT_TABLE_COLUMNS = ["step", "position", "context", "thought", "next_tokens", "reward", "advantage"]


def wandb_mode(requested: str) -> str:
    """'online' / 'offline' / 'disabled' for wandb.mode ('auto' looks for an API key)."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        found = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        found = None
    return "online" if found else "offline"


class MetricsLogger:
    """Rank-0 sink for step metrics and sampled-thought tables; a no-op on other ranks."""

    def __init__(self, config: Config, run_dir: Path, rank: int, resumed_step: int = 0) -> None:
        self.active = rank == 0
        self.run_dir = run_dir
        self.total_steps = config.train.steps
        self.wandb_run = None
        self._started = time.perf_counter()
        self._first_step = resumed_step
        if not self.active:
            return
        for name in ("metrics.jsonl", "thoughts.jsonl"):  # rows a killed run logged after its checkpoint
            _drop_rows_after(run_dir / name, resumed_step)
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        mode = wandb_mode(config.wandb.mode)
        if mode != "disabled":
            self.wandb_run = _start_wandb(config, run_dir, mode)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}, allow_nan=True) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        self._progress(step, metrics)

    def log_thoughts(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Rows of THOUGHT_TABLE_COLUMNS; also appended to thoughts.jsonl in the run directory."""
        if not self.active or not rows:
            return
        with (self.run_dir / "thoughts.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=THOUGHT_TABLE_COLUMNS)
            for row in rows:
                table.add_data(step, *(row[c] for c in THOUGHT_TABLE_COLUMNS[1:]))
            self.wandb_run.log({"thoughts": table}, step=step)

    def _progress(self, step: int, m: dict[str, float]) -> None:
        done = step - self._first_step
        elapsed = time.perf_counter() - self._started
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        width = 24
        filled = int(width * step / max(self.total_steps, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"[{bar}] step {step}/{self.total_steps} loss {_fmt(m.get('loss/total'))} "
            f"reward {_fmt(m.get('reward/mean'))} var {_fmt(m.get('reward/var_within_position'))} "
            f"nll {_fmt(m.get('loss/nll_base'))} tok/s {_fmt(m.get('perf/tokens_per_s'))} eta {eta:.0f}s"
        )
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the JSON lines of `path` whose step is <= `step` (the resumed step will log the rest again)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _start_wandb(config: Config, run_dir: Path, mode: str):
    import wandb

    wandb_dir = run_dir / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    for var, sub in [
        ("WANDB_DIR", ""),
        ("WANDB_CACHE_DIR", ".cache"),
        ("WANDB_DATA_DIR", ".data"),
        ("WANDB_CONFIG_DIR", ".config"),
        ("WANDB_ARTIFACT_DIR", ".artifacts"),
    ]:
        path = wandb_dir / sub if sub else run_dir
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    id_file = run_dir / "wandb_run_id"  # a resumed run continues the same wandb run
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(
        project=config.wandb.project,
        name=config.wandb.name or run_dir.name,
        id=run_id,
        resume="allow",
        mode=mode,
        dir=str(run_dir),
        config=config_to_dict(config),
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
