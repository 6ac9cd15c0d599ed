"""Metrics: one JSON line per optimizer step in metrics.jsonl, the same keys to wandb, a progress bar.

Only rank 0 logs. wandb: mode 'auto' runs online when an API key is configured (WANDB_API_KEY or a netrc
entry for the wandb host) and offline otherwise; every wandb file (run, cache, config, artifacts) lives
inside the run directory, nothing under ~. Offline runs can be uploaded later with `wandb sync`. An unreachable
or refusing wandb server never stops a run: it logs offline instead and says how to sync later.
"""

import contextlib
import json
import logging
import math
import netrc
import os
import re
import secrets
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qstar_rl.config import Config, config_to_dict

if TYPE_CHECKING:
    from qstar_rl.checkpoint import RunState
    from qstar_rl.data import DataStats
    from qstar_rl.learner import StepResult

log = logging.getLogger("qstar_rl")
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
        """One stderr line of the terms a person reads, after a progress bar: `step 7/20 | reward -4.12
        var 1.23e-05 adv>0 50% | nll base 2.35 talk 2.41 | mix w 0.00123 | 812 tok/s eta 1m05s`. Not the
        weighted total loss: its policy term, weighted 1e6 by default, hides everything else."""
        done = step - self._first_step
        elapsed = time.perf_counter() - self._started
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        width = 16
        filled = min(width, int(width * step / max(self.total_steps, 1)))
        bar = "#" * filled + "." * (width - filled)
        frac = m.get("advantage/frac_positive")
        positive = f"{100 * frac:.0f}%" if frac is not None and math.isfinite(frac) else _fmt(frac)
        line = (
            f"[{bar}] step {step}/{self.total_steps}"
            f" | reward {_fmt(m.get('reward/mean'))} var {_fmt(m.get('reward/var_within_position'))}"
            f" adv>0 {positive}"
            f" | nll base {_fmt(m.get('loss/nll_base'))} talk {_fmt(m.get('loss/nll_talk'))}"
            f" | mix w {_fmt(m.get('mixing/weight_mean'))}"
            f" | {_fmt(m.get('perf/tokens_per_s'))} tok/s eta {_duration(eta)}"
        )
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the JSON lines of `path` whose step is <= `step` (the resumed step will log the rest again). A line
    that is not JSON (torn by a power loss or a full disk) is dropped with a warning."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept, torn = [], 0
    for line in lines:
        try:
            row = json.loads(line)
            row_step = row.get("step", 0)
        except (ValueError, AttributeError, RecursionError):
            torn += 1
            continue
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line)
    if torn:
        log.warning("%s: dropped %d line(s) that are not JSON (a torn write)", path, torn)
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _fmt(value: float | None) -> str:
    """Compact: 3 significant digits; scientific below 1e-3 (small variances and mixing weights) and from
    1e6; whole numbers from 1000 (throughputs); '-' when the metric is missing."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    size = abs(value)
    if size == 0:
        return "0"
    if size < 1e-3 or size >= 1e6:
        return f"{value:.2e}"
    if size >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    """45s, 1m05s, 2h03m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def valid_wandb_run_id(text: str) -> bool:
    """What this project writes to wandb_run_id (secrets.token_hex): an empty or damaged file is not one."""
    return re.fullmatch(r"[a-z0-9]{1,64}", text) is not None


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
    run_id = id_file.read_text(errors="replace").strip() if id_file.exists() else ""
    if not valid_wandb_run_id(run_id):
        if id_file.exists():
            log.warning("%s holds no valid wandb run id (%r): starting a new wandb run", id_file, run_id[:20])
        run_id = secrets.token_hex(4)
    id_file.write_text(run_id)

    def init(mode: str):
        return wandb.init(
            project=config.wandb.project,
            name=config.wandb.name or run_dir.name,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(run_dir),
            config=config_to_dict(config),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, init_timeout=60),
        )

    if mode != "online":
        return init(mode)
    problem = _unreachable(wandb.Settings().base_url)
    if problem is None:
        try:
            return init("online")
        except Exception as err:  # wandb raises its own CommError / UsageError / timeouts; none may stop a run
            problem = f"{type(err).__name__}: {str(err)[:200]}"
            with contextlib.suppress(Exception):
                wandb.finish()
    log.warning(
        "wandb is unreachable (%s): logging offline into %s instead; upload later with `wandb sync %s`",
        problem,
        wandb_dir,
        wandb_dir / "offline-run-*",
    )
    return init("offline")


def _unreachable(url: str, timeout_s: float = 5.0) -> str | None:
    """Why wandb's server at `url` cannot be reached (no TCP connection within `timeout_s`), or None."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
    except OSError as err:
        return f"{url}: {type(err).__name__}: {err}"
    return None


def setup_logging(run_dir: Path, rank: int) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        handlers=handlers,
        force=True,
        format="%(asctime)s %(levelname)s %(message)s",
    )


def log_step(
    logger: MetricsLogger,
    config: Config,
    tokenizer,
    state: "RunState",
    result: "StepResult",
    data_stats: "DataStats",
    extra: dict[str, float] | None = None,
) -> None:
    """Count a skipped step, log the step's metrics (plus `extra`) and, every N steps, the thought table."""
    state.skipped_steps += result.skipped
    if result.skipped:
        log.warning("step %d: non-finite gradient, step skipped (weights untouched)", state.step)
    metrics = {**result.metrics, "optim/skipped_steps": state.skipped_steps, **data_stats.as_metrics()}
    logger.log_step(state.step, {**metrics, **(extra or {})})
    every = config.train.thought_table_every
    if every and state.step % every == 0:
        logger.log_thoughts(state.step, thought_rows(result.samples, tokenizer))


def thought_rows(samples: list[dict], tokenizer) -> list[dict]:
    """Decoded rows (context, thought, next tokens, reward, advantage) for the sampled-thought table."""
    rows = []
    for sample in samples:
        mean = sum(sample["rewards"]) / len(sample["rewards"])
        for thought_ids, reward in zip(sample["thought_ids"], sample["rewards"], strict=True):
            rows.append(
                {
                    "position": sample["position"],
                    "context": tokenizer.decode(sample["context_ids"]),
                    "thought": tokenizer.decode(thought_ids),
                    "next_tokens": tokenizer.decode(sample["next_ids"]),
                    "reward": reward,
                    "advantage": reward - mean,
                }
            )
    return rows
