"""`qstar-rl ray-train`: the single controller that runs Quiet-STaR training on a Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \\
        -- python -m qstar_rl.ray_train --config CONFIG.yaml train.run_dir=/shared/runs/NAME
    qstar-rl ray-train --config qstar_rl/configs/tiny.yaml cluster.learners=2 \\
        cluster.gpus_per_learner=0 cluster.gpus_per_rollout=0          # a private local Ray cluster

The driver checks the resource plan against the cluster (exit 2 when it cannot fit), places a learner
group (cluster.learners DeepSpeed ZeRO-3 ranks, one actor each) and a rollout group (cluster.rollout_workers
actors with full inference weights), then per step: reads the data, has the rollout actors sample the
thoughts, hands them through the object store to the learner ranks, lets them step, and pushes the new
weights to the rollout actors. Metrics, wandb and the thought table come from the driver only; checkpoints
are written by the learner ranks into train.run_dir (shared storage on a multi-node cluster). Every wait
has a timeout; an actor that dies or hangs stops the run with its name, or restarts every actor from the
last checkpoint while cluster.max_restarts allows.
"""

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
import yaml
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qstar_rl import checkpoint, rundir
from qstar_rl.checks import run_problems
from qstar_rl.config import (
    ClusterConfig,
    Config,
    ConfigError,
    config_to_dict,
    load_config_and_problems,
    validate_cluster,
)
from qstar_rl.data import DataError, DataPosition, DataStats, WindowStream, check_source
from qstar_rl.engine import CPU_ALLOCATOR_DESCRIPTIONS, cpu_allocator_environment
from qstar_rl.eval import eval_due
from qstar_rl.learner import StepResult, step_timings, throughput
from qstar_rl.loading import load_tokenizer
from qstar_rl.metrics import MetricsLogger, log_step, setup_logging
from qstar_rl.ray_workers import LearnerWorker, RolloutWorker
from qstar_rl.rundir import RunDirError

log = logging.getLogger("qstar_rl")

# Environment the actors need from the driver's (fault injection, model cache, hub and DeepSpeed knobs).
FORWARDED_ENV_PREFIXES = ("QSTAR_RL_", "HF_", "TRANSFORMERS_", "DS_", "NCCL_", "TORCH_EXTENSIONS_DIR", "PYTHONWARN")


class ResourceError(RuntimeError):
    """The cluster cannot hold the requested actors (exit code 2)."""


class ActorFailure(RuntimeError):
    """An actor died, failed or did not answer in time; the message names it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qstar-rl ray-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--resume", choices=["auto", "never"], default="auto", help="as for qstar-rl train")
    parser.add_argument("--allow-config-change", action="store_true", help="as for qstar-rl train")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, problems = load_config_and_problems(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    problems += run_problems(config, config.cluster.learners) + validate_cluster(config)
    problems += submitted_job_problems(config)
    if problems:
        print(ConfigError(problems), file=sys.stderr)
        return 2
    try:
        train(config, resume=args.resume == "auto", allow_config_change=args.allow_config_change)
    except (ResourceError, RunDirError, DataError, checkpoint.CheckpointReadError) as err:
        print(f"qstar-rl ray-train: {err}", file=sys.stderr)
        return 2
    except ActorFailure as err:
        print(f"qstar-rl ray-train: stopped: {err}", file=sys.stderr)
        return 1
    return 0


def submitted_job_problems(config: Config) -> list[str]:
    """Under `ray job submit` the driver and every actor run in their own temporary copy of the working
    directory, so a relative run directory would scatter checkpoints over those copies and vanish with them."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and not Path(config.train.run_dir).is_absolute():
        return [
            f"train.run_dir: {config.train.run_dir!r} is relative, which under `ray job submit` means the job's "
            "temporary copy of the working directory; give an absolute path on storage that every node sees"
        ]
    return []


# ---- resources --------------------------------------------------------------------------------------


def bundles(cluster: ClusterConfig) -> list[dict[str, float]]:
    """One placement-group bundle per actor: the learners first, then the rollout workers."""

    def bundle(cpus: float, gpus: float) -> dict[str, float]:
        return {"CPU": cpus, "GPU": gpus} if gpus > 0 else {"CPU": cpus}

    learner = bundle(cluster.cpus_per_learner, cluster.gpus_per_learner)
    rollout = bundle(cluster.cpus_per_rollout, cluster.gpus_per_rollout)
    return [learner] * cluster.learners + ([] if cluster.colocate else [rollout] * cluster.rollout_workers)


def resource_problems(cluster: ClusterConfig, nodes: list[dict[str, float]]) -> list[str]:
    """Why the planned actors cannot be placed on nodes with these free resources ([] when they can)."""
    plan = bundles(cluster)
    rollouts = 0 if cluster.colocate else cluster.rollout_workers
    problems = []
    for kind, per_learner, per_rollout in (
        ("GPU", cluster.gpus_per_learner, cluster.gpus_per_rollout),
        ("CPU", cluster.cpus_per_learner, cluster.cpus_per_rollout),
    ):
        need = sum(b.get(kind, 0.0) for b in plan)
        have = sum(n.get(kind, 0.0) for n in nodes)
        if need > have:
            problems.append(
                f"needs {need:g} {kind}s ({cluster.learners} learners x {per_learner:g} + {rollouts} rollout "
                f"workers x {per_rollout:g}) but the cluster has {have:g} free "
                f"(cluster.{kind.lower()}s_per_learner / cluster.{kind.lower()}s_per_rollout"
                + (", 0 GPUs on a CPU-only cluster)" if kind == "GPU" else ")")
            )
    for name, b in (("learner", plan[0]), ("rollout worker", plan[-1])):
        if not any(all(n.get(k, 0.0) >= v for k, v in b.items()) for n in nodes):
            problems.append(f"no node has room for one {name} ({b}); the largest free node has {_largest(nodes)}")
    return problems


def _largest(nodes: list[dict[str, float]]) -> dict[str, float]:
    if not nodes:
        return {}
    best = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
    return {k: best[k] for k in ("CPU", "GPU") if k in best}


def free_node_resources() -> list[dict[str, float]]:
    """Free CPU/GPU of every alive node (what a placement group can still get)."""
    # Ray has no public per-node view of free resources; this is what `ray status` reads.
    per_node = ray._private.state.available_resources_per_node()
    return [{k: float(free.get(k, 0.0)) for k in ("CPU", "GPU")} for free in per_node.values()]


def connect(cluster: ClusterConfig) -> bool:
    """Join the configured Ray cluster (or start a private local one); True when this call started Ray."""
    if ray.is_initialized():
        return False
    address = cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    # A laptop run: a private cluster bound to loopback, with at least as many logical CPUs as the plan.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; token mode writes ~/.ray/auth_token
    need = sum(b["CPU"] for b in bundles(cluster))
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    return True


# ---- the actor group -------------------------------------------------------------------------------


@dataclass
class Named:
    """A pending actor call and the actor's name, so that failures can say who failed."""

    name: str
    ref: ray.ObjectRef


def wait_all(calls: list[Named], timeout: float, what: str) -> list:
    """Results of all calls, in order; ActorFailure as soon as one fails, or when `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    by_ref = {c.ref: c for c in calls}
    pending = list(by_ref)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            late = ", ".join(sorted({by_ref[r].name for r in pending}))
            raise ActorFailure(f"{late}: no answer to {what} within {timeout:g} s (cluster timeouts)")
        call = by_ref[ready[0]]
        try:
            ray.get(call.ref, timeout=0)
        except ray.exceptions.RayActorError as err:
            raise ActorFailure(f"{call.name} died during {what}: {_first_line(err)}") from err
        except ray.exceptions.RayTaskError as err:
            raise ActorFailure(f"{call.name} failed during {what}:\n{err}") from err
    return [ray.get(c.ref) for c in calls]


def _first_line(err: Exception) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)


class ActorGroup:
    """The placement group, learner actors and rollout actors of one attempt."""

    def __init__(self, config: Config) -> None:
        self.config, cluster = config, config.cluster
        problems = resource_problems(cluster, free_node_resources())
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise ResourceError(f"the resource plan does not fit the cluster:\n{listed}")
        plan = bundles(cluster)
        self.placement = placement_group(plan, strategy="PACK")
        try:
            ray.get(self.placement.ready(), timeout=cluster.startup_timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            remove_placement_group(self.placement)
            raise ResourceError(
                f"could not place {plan} within {cluster.startup_timeout_s:g} s (cluster.startup_timeout_s)"
            ) from err
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        ds_json = json.loads(Path(config.deepspeed.config).read_text())

        def options(index: int, cpus: float, gpus: float) -> dict:
            strategy = PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=index)
            # jemalloc, where model.cpu_allocator wants it, must be there when the actor's process starts
            allocator_env = cpu_allocator_environment(config.model, on_gpu=gpus > 0)
            return {
                "num_cpus": cpus,
                "num_gpus": gpus,
                "scheduling_strategy": strategy,
                "runtime_env": {"env_vars": {**env, **allocator_env}},
                "max_restarts": 0,  # restarts are the driver's: all actors together, from a checkpoint
            }

        remote_learner, remote_rollout = ray.remote(LearnerWorker), ray.remote(RolloutWorker)
        self.learners = [
            remote_learner.options(**options(r, cluster.cpus_per_learner, cluster.gpus_per_learner)).remote(
                config, r, cluster.learners, ds_json
            )
            for r in range(cluster.learners)
        ]
        self.rollouts = (
            []
            if cluster.colocate
            else [
                remote_rollout.options(
                    **options(cluster.learners + i, cluster.cpus_per_rollout, cluster.gpus_per_rollout)
                ).remote(config, i)
                for i in range(cluster.rollout_workers)
            ]
        )

    def on_learners(self, method: str, *args, timeout: float | None = None, per_rank: list | None = None) -> list:
        """Call a method on every learner at once (per_rank: a first argument per rank) and wait."""
        calls = [
            Named(f"learner-{r}", getattr(a, method).remote(*([per_rank[r]] if per_rank else []), *args))
            for r, a in enumerate(self.learners)
        ]
        return wait_all(calls, timeout or self.config.train.step_timeout_s, method)

    def on_rollouts(self, method: str, *args, timeout: float | None = None) -> list:
        calls = [Named(f"rollout-{i}", getattr(a, method).remote(*args)) for i, a in enumerate(self.rollouts)]
        return wait_all(calls, timeout or self.config.train.step_timeout_s, method)

    def setup(self, resume_from: Path | None, other_world_size: bool = False) -> int:
        """Start DeepSpeed on the learners (rank 0 names the rendezvous), load models; returns the step."""
        startup = self.config.cluster.startup_timeout_s
        rendezvous = Named("learner-0", self.learners[0].address.remote())
        master_addr, master_port = wait_all([rendezvous], startup, "address")[0]
        pending_rollouts = [Named(f"rollout-{i}", a.setup.remote()) for i, a in enumerate(self.rollouts)]
        folder = str(resume_from) if resume_from else None
        steps = self.on_learners("setup", master_addr, master_port, folder, other_world_size, timeout=startup)
        rank0_dtype = Named("learner-0", self.learners[0].model_dtype.remote())
        self.model_dtype: str = wait_all([rank0_dtype], startup, "model_dtype")[0]  # model.dtype as resolved there
        rank0_allocator = Named("learner-0", self.learners[0].allocator.remote())
        self.allocator: str = wait_all([rank0_allocator], startup, "allocator")[0]  # the CPU allocator there
        wait_all(pending_rollouts, startup, "setup")
        if len(set(steps)) != 1:
            raise ActorFailure(f"learners resumed at different steps {steps}")
        return steps[0]

    def publish_weights(self) -> list[ray.ObjectRef]:
        """The learners' current weights as object-store chunks (a ZeRO-3 gather on every rank)."""
        return self.on_learners("publish_weights", self.config.cluster.weight_sync_chunk_mb)[0]

    def push_weights(self, version: int) -> list[Named]:
        """Publish the learners' weights and start loading them into every rollout actor; returns the
        pending loads (each rollout actor applies its load before any sample call made after this)."""
        chunks = self.publish_weights()
        return [Named(f"rollout-{i}", a.load_weights.remote(chunks, version)) for i, a in enumerate(self.rollouts)]

    def sample(self, per_rank: list[list[dict[str, torch.Tensor]]]) -> list[list[Named]]:
        """Hand each micro-batch ([rank][micro]) to a rollout actor, round robin; returns the pending
        ThoughtBatch refs in the same layout."""
        flat_index = 0
        out: list[list[Named]] = []
        for micro_batches in per_rank:
            row = []
            for batch in micro_batches:
                i = flat_index % len(self.rollouts)
                row.append(Named(f"rollout-{i}", self.rollouts[i].sample.remote(batch)))
                flat_index += 1
            out.append(row)
        return out

    def learn(self, step: int, thoughts: list[list[Named]]) -> StepResult:
        """Every learner rank steps on its own micro-batches' thoughts (refs, fetched by the learner);
        returns rank 0's result."""
        return self.on_learners("learn", step, per_rank=[[t.ref for t in row] for row in thoughts])[0]

    def shutdown(self) -> None:
        for actor in self.learners + self.rollouts:
            ray.kill(actor)
        remove_placement_group(self.placement)


# ---- the step loops: one per placement --------------------------------------------------------------


@dataclass
class DrawnStep:
    """One optimizer step's data, drawn by the driver, with the stream's position right after it."""

    per_rank: list[list[dict[str, torch.Tensor]]]
    """[rank][micro-batch] -> input_ids, attention_mask, window_ids."""
    position: DataPosition
    """Where the data stream stands once this step's windows are consumed (saved with a checkpoint)."""
    stats: DataStats
    """The stream's skip counters at that point."""


# Each loop runs optimizer steps first_step .. train.steps - 1 and yields every step's data and rank 0's result
# (with its time/* and perf/* metrics) as soon as the learners have stepped; the caller logs, evaluates and
# checkpoints between steps.
StepLoop = Iterator[tuple[DrawnStep, StepResult]]


def colocated_steps(group: ActorGroup, config: Config, draw: Callable[[], DrawnStep], first_step: int) -> StepLoop:
    """cluster.colocate: every learner rank samples its own thoughts with gathered weights, then learns."""
    for step in range(first_step, config.train.steps):
        drawn = draw()
        yield drawn, group.on_learners("sample_and_learn", step, per_rank=drawn.per_rank)[0]


def synchronous_steps(group: ActorGroup, config: Config, draw: Callable[[], DrawnStep], first_step: int) -> StepLoop:
    """Rollout actors sample with the weights of this step (on-policy); the learners step; the new weights
    reach every rollout actor before the next step samples."""
    timeout = config.train.step_timeout_s
    for step in range(first_step, config.train.steps):
        start = time.perf_counter()
        drawn = draw()
        thoughts = group.sample(drawn.per_rank)
        wait_all([t for row in thoughts for t in row], timeout, "sample")
        learn_start = time.perf_counter()
        result = group.learn(step, thoughts)
        sync_start = time.perf_counter()
        wait_all(group.push_weights(step + 1), timeout, "load_weights")
        yield drawn, with_timings(result, start, learn_start, sync_start)


def async_steps(group: ActorGroup, config: Config, draw: Callable[[], DrawnStep], first_step: int) -> StepLoop:
    """cluster.async_rollout: while the learners learn step s, the rollout actors already sample step s + 1
    with the weights before that update (one version stale; the learner importance-corrects it). The new
    weights queue behind those samples on each rollout actor and are waited for with the next step's."""
    timeout = config.train.step_timeout_s

    def draw_and_sample() -> tuple[DrawnStep, list[list[Named]]]:
        drawn = draw()
        return drawn, group.sample(drawn.per_rank)

    upcoming = None  # the next step's data, its thoughts already being sampled
    loads: list[Named] = []  # weight loads not yet waited for
    for step in range(first_step, config.train.steps):
        start = time.perf_counter()
        drawn, thoughts = upcoming or draw_and_sample()
        wait_all(loads + [t for row in thoughts for t in row], timeout, "sample")
        upcoming = draw_and_sample() if step + 1 < config.train.steps else None  # by the weights about to change
        learn_start = time.perf_counter()
        result = group.learn(step, thoughts)
        sync_start = time.perf_counter()
        loads = group.push_weights(step + 1)
        yield drawn, with_timings(result, start, learn_start, sync_start)
    wait_all(loads, timeout, "load_weights")


def with_timings(result: StepResult, start: float, learn_start: float, sync_start: float) -> StepResult:
    """Rank 0's result with the driver's view of the step: rollout = waiting for thoughts, learn = the learner's
    own measure, weight sync = publishing and (synchronous) loading the new weights, step = all of it."""
    now = time.perf_counter()
    metrics = result.metrics
    metrics.update(step_timings(learn_start - start, metrics["time/learn"], now - sync_start, now - start))
    metrics.update(throughput(metrics, now - start))
    return result


def train(config: Config, resume: bool = True, allow_config_change: bool = False) -> Path:
    """Run (or resume) training on Ray; returns the run directory. Raises ResourceError, ActorFailure,
    RunDirError (the run directory is in use, damaged, or the config change is refused)."""
    run_dir = Path(config.train.run_dir).resolve()
    config = copy.deepcopy(config)
    config.train.run_dir = str(run_dir)  # the actors may run elsewhere: no paths relative to this process
    run_dir.mkdir(parents=True, exist_ok=True)
    check_source(config.data, load_tokenizer(config.model.name), config.train.seed, config.cluster.learners)
    lock = rundir.lock(run_dir)  # held by this driver until it exits
    plan = rundir.plan_start(run_dir, resume, config_to_dict(config), allow_config_change, config.cluster.learners)
    setup_logging(run_dir, 0)
    for note in plan.notes:
        log.warning("%s", note)
    started_ray = connect(config.cluster)
    try:
        restarts = 0
        resume_from = Path(plan.resume_from) if plan.resume_from else None
        written_by = plan.written_by_world_size
        while True:
            try:
                run_attempt(config, resume_from, written_by, restarts)
                return run_dir
            except ActorFailure as failure:
                if restarts >= config.cluster.max_restarts:
                    raise
                restarts += 1
                log.warning(
                    "%s\nrestart %d of %d from the last checkpoint", failure, restarts, config.cluster.max_restarts
                )
                found = checkpoint.find_resumable(run_dir)
                resume_from, written_by = found.folder, found.world_size
    finally:
        if started_ray:
            ray.shutdown()
        os.close(lock)


def run_attempt(config: Config, latest: Path | None, written_by: int | None, restarts: int) -> None:
    """Place the actors, resume from checkpoint `latest` (written by `written_by` ranks) if given, and train
    to train.steps."""
    run_dir, cluster = Path(config.train.run_dir), config.cluster
    state = checkpoint.load_run_state(latest) if latest else checkpoint.RunState()
    tokenizer = load_tokenizer(config.model.name)
    stream = WindowStream(config.data, tokenizer, seed=config.train.seed, rank=0, world_size=cluster.learners)
    stream.position, stream.stats = copy.copy(state.data), copy.copy(state.data_stats)
    accumulation = config.train.global_batch_size // (config.train.micro_batch_size * cluster.learners)
    batches = stream.step_batches(config.train.micro_batch_size, accumulation)

    start = time.perf_counter()
    group = ActorGroup(config)
    logger = None
    try:
        step = group.setup(latest, written_by not in (None, cluster.learners))
        if step != state.step:
            raise ActorFailure(f"learners resumed at step {step}, the run state says {state.step}")
        # model.dtype as the learners resolved it on their own devices (the driver may be a CPU head node)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=group.model_dtype))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        if group.rollouts:
            wait_all(group.push_weights(step), config.train.step_timeout_s, "load_weights")
        log.info(
            "ray-train %s (%s): %d learners (CPU allocator: %s), %s, started in %.1f s%s",
            config.model.name,
            config.model.dtype,
            cluster.learners,
            CPU_ALLOCATOR_DESCRIPTIONS[group.allocator],
            "colocated rollout" if cluster.colocate else f"{len(group.rollouts)} rollout workers",
            time.perf_counter() - start,
            f", resumed from {latest}" if latest else "",
        )
        logger = MetricsLogger(config, run_dir, 0, resumed_step=state.step)

        def draw() -> DrawnStep:
            return DrawnStep(next(batches), copy.copy(stream.position), copy.copy(stream.stats))

        loop = colocated_steps if cluster.colocate else async_steps if cluster.async_rollout else synchronous_steps
        for drawn, result in loop(group, config, draw, state.step):
            state.step += 1
            state.data, state.data_stats = drawn.position, drawn.stats
            extra = {"cluster/restarts": restarts}
            if eval_due(config.eval, state.step, config.train.steps):
                extra.update(group.on_learners("evaluate")[0])
            log_step(logger, config, tokenizer, state, result, drawn.stats, extra)
            if state.step % config.train.checkpoint_every == 0 or state.step == config.train.steps:
                group.on_learners("save_checkpoint", state)
        log.info("done: %s", run_dir)
    finally:
        if logger is not None:
            logger.close()
        group.shutdown()


if __name__ == "__main__":
    sys.exit(main())
