"""`qstar-rl train`: Quiet-STaR training under DeepSpeed ZeRO-3.

    qstar-rl train --config qstar_rl/configs/default.yaml [dotted.key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module qstar_rl.train --config ...   # 2 ranks on CPU (gloo)
    deepspeed --num_gpus 8 --module qstar_rl.train --config ...                      # 8 GPUs (NCCL)

A run directory holds config.yaml, metrics.jsonl, thoughts.jsonl, train.log, checkpoints/, attempts/ and wandb/.
Starting again with the same run directory resumes from its newest intact checkpoint; --resume never starts
over instead, after moving the old history to previous-<time>/ (see qstar_rl/rundir.py).
Exit codes: 0 done, 1 a failure during training (named in the log), 2 bad input (config, run directory).
"""

import argparse
import copy
import logging
import os
import random
import sys
import warnings
from pathlib import Path

import torch

from qstar_rl import checkpoint, rundir
from qstar_rl.checks import run_problems
from qstar_rl.config import Config, ConfigError, config_to_dict, load_config_and_problems
from qstar_rl.data import HELDOUT_OF, DataError, WindowStream, check_source
from qstar_rl.engine import (
    CPU_ALLOCATOR_DESCRIPTIONS,
    all_reduce_sum,
    broadcast_from_rank0,
    build_thinking_engine,
    configure_cpu_allocator,
    finish_distributed,
    init_distributed,
    is_collective_timeout,
    partition_report,
    peer_disconnected,
    resolve_cpu_allocator,
    restart_with_cpu_allocator,
    with_resolved_dtype,
)
from qstar_rl.eval import eval_due, periodic_eval
from qstar_rl.learner import train_step
from qstar_rl.loading import load_tokenizer
from qstar_rl.metrics import MetricsLogger, log_step, setup_logging
from qstar_rl.model import NonFiniteModel
from qstar_rl.report import end_of_run_report
from qstar_rl.rundir import RunDirError

log = logging.getLogger("qstar_rl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qstar-rl train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument(
        "--resume",
        choices=["auto", "never"],
        default="auto",
        help="auto: continue from the run directory's last complete checkpoint, if any",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config changes the method (thought length, R, K, T, model, data, seed)",
    )
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    return parser.parse_args(argv)


def load_and_validate(config_path: str | None, overrides: list[str]) -> Config:
    """The config, or ConfigError listing every problem (before anything heavy happens)."""
    config, problems = load_config_and_problems(config_path, overrides)
    problems += run_problems(config, int(os.environ.get("WORLD_SIZE", "1")))
    if problems:
        raise ConfigError(problems)
    return config


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed ZeRO-3 calls a torch collective that torch marks deprecated, once per step; nothing to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    args = parse_args(argv)
    try:
        config = load_and_validate(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if argv is None:  # a process of its own (the command line, a launcher's rank): it may start over
        restart_with_cpu_allocator(config.model)
    try:
        train(config, resume=args.resume == "auto", allow_config_change=args.allow_config_change)
    except (RunDirError, DataError, checkpoint.CheckpointReadError) as err:
        if os.environ.get("RANK", "0") == "0":  # every rank raises the same error; one says it
            print(f"error: {err}", file=sys.stderr)
        return 2
    except (checkpoint.CheckpointWriteError, RankTimeout, NonFiniteModel) as err:
        log.error("%s", err)
        return 1
    return 0


class RankTimeout(Exception):
    """A collective waited longer than train.step_timeout_s for another rank, or lost its connection to it."""


def start_plan(
    run_dir: Path, resume: bool, config_dict: dict, allow_config_change: bool, rank: int, world: int
) -> tuple[rundir.StartPlan, int | None]:
    """Rank 0 locks the run directory and decides where to start; every rank gets the same plan or the same
    RunDirError. Returns the plan and rank 0's lock (an open descriptor: the lock lasts while it is open)."""
    outcome: rundir.StartPlan | RunDirError
    lock = None
    if rank == 0:
        try:
            lock = rundir.lock(run_dir)
            outcome = rundir.plan_start(run_dir, resume, config_dict, allow_config_change, world)
        except RunDirError as err:
            outcome = err
    outcome = broadcast_from_rank0(outcome if rank == 0 else None)
    if isinstance(outcome, RunDirError):
        raise outcome
    return outcome, lock


def train(config: Config, resume: bool = True, allow_config_change: bool = False) -> Path:
    """Run (or resume) training; returns the run directory. Raises RunDirError (bad run directory or refused
    config change), CheckpointWriteError (disk full), RankTimeout (a rank stopped answering)."""
    allocator = configure_cpu_allocator(config.model)  # before anything large is allocated
    rank, world, local_rank = init_distributed(config.train.step_timeout_s)
    config = with_resolved_dtype(config)  # 'auto' -> this rank's device decides; config.yaml records the outcome
    run_dir = Path(config.train.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = config_to_dict(config)
    check_source(config.data, load_tokenizer(config.model.name), config.train.seed, world)  # before anything moves
    plan, lock = start_plan(run_dir, resume, config_dict, allow_config_change, rank, world)
    setup_logging(run_dir, rank)
    for note in plan.notes if rank == 0 else []:
        log.warning("%s", note)
    stop_if_launcher_gone = rundir.watch_launcher(rank)
    heartbeats = rundir.Heartbeats(run_dir, rank)
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")

    # A checkpoint from another world size loads through DeepSpeed's universal format (same global batch: the
    # data stream's position is global, so the run continues as an uninterrupted one at this world size would).
    other_world = plan.resume_from is not None and plan.written_by_world_size not in (None, world)
    model, tokenizer, engine, full_weights = build_thinking_engine(config, world, load_universal=other_world)
    log.info(partition_report(model, rank))
    accumulation = config.train.global_batch_size // (config.train.micro_batch_size * world)
    stream = WindowStream(config.data, tokenizer, seed=config.train.seed, rank=rank, world_size=world)

    state = checkpoint.RunState()
    latest = Path(plan.resume_from) if plan.resume_from else None
    if latest is not None:
        if other_world:
            log.info("%s was written by %d rank(s); resuming on %d", latest.name, plan.written_by_world_size, world)
        state = checkpoint.load(engine, latest, rank, other_world)
        checkpoint.restore_rngs(state)
        stream.position, stream.stats = copy.copy(state.data), copy.copy(state.data_stats)
        log.info("resumed from %s (step %d)", latest, state.step)
    batches = stream.batches(config.train.micro_batch_size)
    logger = MetricsLogger(config, run_dir, rank, resumed_step=state.step)
    log.info(
        "training %s (%s, activation checkpointing %s): %d steps, world %d, B=%d, accumulation %d, T=%d, R=%d, "
        "M=%d, K=%d",
        config.model.name,
        config.model.dtype,
        "on" if config.model.gradient_checkpointing else "off",
        config.train.steps,
        world,
        config.train.micro_batch_size,
        accumulation,
        config.data.seq_len,
        config.thought.num_thoughts,
        config.thought.length,
        config.thought.talk_length,
    )
    if device.type == "cpu":
        log.info("CPU allocator: %s", CPU_ALLOCATOR_DESCRIPTIONS[allocator])
        if allocator != "jemalloc" and resolve_cpu_allocator(config.model, on_gpu=False) == "jemalloc":
            log.warning(
                "model.cpu_allocator asks for jemalloc, which only a fresh process can preload: start "
                "training with `qstar-rl train` or `python -m qstar_rl.train` to have it"
            )

    while state.step < config.train.steps:
        try:  # every collective of the step, its evaluation and its checkpoint waits at most train.step_timeout_s
            heartbeats.beat(state.step + 1, "starting")
            micro_batches = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(accumulation)]
            result = train_step(engine, model, micro_batches, config, state.step, all_reduce_sum, world, full_weights)
            state.step += 1
            extra = {}
            if eval_due(config.eval, state.step, config.train.steps):
                extra = periodic_eval(model, tokenizer, config.eval, full_weights)
            log_step(logger, config, tokenizer, state, result, stream.stats, extra)
            if state.step % config.train.checkpoint_every == 0 or state.step == config.train.steps:
                heartbeats.beat(state.step, "checkpointing after")
                checkpoint.capture_rngs(state)
                state.data, state.data_stats = copy.copy(stream.position), copy.copy(stream.stats)
                checkpoint.save(engine, run_dir, state, config_dict, rank, config.train.keep_checkpoints)
        except RuntimeError as err:
            if world > 1 and is_collective_timeout(err):
                stop_if_launcher_gone()  # the usual reason a peer vanished: say so, not "a rank stopped answering"
                laggard = heartbeats.stop_laggard(world)
                what = (
                    "lost its connection to another rank"
                    if peer_disconnected(err)
                    else f"waited more than train.step_timeout_s ({config.train.step_timeout_s:g} s)"
                )
                raise RankTimeout(f"a collective {what}: {laggard}; stopping the job") from err
            raise
    logger.close()
    finish_distributed()  # the report below is rank 0's alone: the others need not wait for it
    log.info("done: %s", run_dir)
    heldout = HELDOUT_OF.get(config.data.source)
    if rank == 0 and config.train.report_windows and heldout is not None:
        log.info("measuring thinking on %d held-out windows (%s) ...", config.train.report_windows, heldout)
        for line in end_of_run_report(run_dir, heldout, config.data.seq_len, config.train.report_windows):
            log.info(line)
    if lock is not None:
        os.close(lock)
    return run_dir


if __name__ == "__main__":
    sys.exit(main())
