"""The two Ray actors of `qstar-rl ray-train`: a learner (one DeepSpeed ZeRO-3 rank) and a rollout worker
(full inference weights). Plain classes; the driver (ray_train.py) makes actors of them with
`ray.remote(cls).options(...)`. They hold no schedule of their own: the driver says what to do each step.

Weights travel learner -> rollout as a list of object-store chunks ({parameter name: tensor}, about
cluster.weight_sync_chunk_mb each), published by learner rank 0 inside one ZeRO-3 gather that every rank
joins, and stamped with the policy version (optimizer steps taken).
"""

import copy
import logging
import os
import sys
import warnings
from pathlib import Path

import ray
import torch

from qstar_rl import checkpoint
from qstar_rl.config import Config, config_to_dict
from qstar_rl.engine import (
    all_reduce_sum,
    build_thinking_engine,
    configure_cpu_allocator,
    free_port,
    init_distributed,
    partition_report,
    with_resolved_dtype,
)
from qstar_rl.eval import periodic_eval
from qstar_rl.faults import kill_at
from qstar_rl.learner import StepResult, learn_step, train_step
from qstar_rl.loading import build_thinking_lm
from qstar_rl.rollout import ThoughtBatch, rollout

log = logging.getLogger("qstar_rl")


def _quiet_logging(name: str) -> None:
    # Actor output is forwarded to the driver's terminal: warnings only, tagged with the actor's name.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, force=True, format=f"%(asctime)s {name} %(levelname)s %(message)s"
    )


def _device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU, so it is always device 0.
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class LearnerWorker:
    """One data-parallel rank of the learner group: a DeepSpeed ZeRO-3 engine over ThinkingLM."""

    def __init__(self, config: Config, rank: int, world_size: int, ds_json: dict) -> None:
        self.config, self.rank, self.world_size, self.ds_json = config, rank, world_size, ds_json
        _quiet_logging(f"learner-{rank}")

    def address(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0's become the process group's rendezvous."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, resume_from: str | None, other_world_size: bool) -> int:
        """Join the process group, build the engine, load checkpoint `resume_from` if given (written at another
        world size: `other_world_size`); returns the optimizer steps already taken."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        self.cpu_allocator = configure_cpu_allocator(self.config.model)  # preloaded at start: see ray_train
        init_distributed(self.config.train.step_timeout_s)
        # model.dtype 'auto' is decided by this actor's device, not the driver's (which may be a CPU head node).
        self.config = with_resolved_dtype(self.config)
        torch.manual_seed(self.config.train.seed)
        self.model, self.tokenizer, self.engine, self.full_weights = build_thinking_engine(
            self.config, self.world_size, self.ds_json, load_universal=other_world_size
        )
        if self.rank == 0:
            log.warning(partition_report(self.model, self.rank))
        self.step = 0
        if resume_from is not None:
            state = checkpoint.load(self.engine, Path(resume_from), self.rank, other_world_size)
            checkpoint.restore_rngs(state)
            self.step = state.step
        return self.step

    def model_dtype(self) -> str:
        """The compute dtype this rank resolved model.dtype to in `setup` (the driver records rank 0's)."""
        return self.config.model.dtype

    def allocator(self) -> str:
        """The CPU allocator in effect in this actor since `setup` (engine.configure_cpu_allocator)."""
        return self.cpu_allocator

    def learn(self, thought_refs: list[ray.ObjectRef], policy_version: int) -> StepResult:
        """One optimizer step on this rank's micro-batches, sampled by the rollout actors."""
        thoughts = [t.to(_device()) for t in ray.get(thought_refs, timeout=self.config.train.step_timeout_s)]
        result = learn_step(self.engine, thoughts, self.config, policy_version, all_reduce_sum, self.world_size)
        self.step = policy_version + 1
        return result

    def sample_and_learn(self, micro_batches: list[dict[str, torch.Tensor]], policy_version: int) -> StepResult:
        """The colocated step: sample this rank's thoughts with gathered weights, then learn."""
        batches = [{k: v.to(_device()) for k, v in b.items()} for b in micro_batches]
        result = train_step(
            self.engine,
            self.model,
            batches,
            self.config,
            policy_version,
            all_reduce_sum,
            self.world_size,
            self.full_weights,
        )
        self.step = policy_version + 1
        return result

    def evaluate(self) -> dict[str, float]:
        """Periodic zero-shot evaluation (every rank at once, see eval.periodic_eval)."""
        return periodic_eval(self.model, self.tokenizer, self.config.eval, self.full_weights)

    def publish_weights(self, chunk_mb: int) -> list[ray.ObjectRef]:
        """Gather the ZeRO-3 partitions (every rank must call this at once); rank 0 puts the full weights
        into the object store in chunks and returns their refs, the others return []."""
        chunks: list[ray.ObjectRef] = []
        with self.full_weights():
            if self.rank == 0:
                limit, chunk, size = chunk_mb * 2**20, {}, 0
                for name, param in self.model.named_parameters():
                    chunk[name] = param.detach().to("cpu", copy=True)
                    size += param.numel() * param.element_size()
                    if size >= limit:
                        chunks.append(ray.put(chunk))
                        chunk, size = {}, 0
                if chunk:
                    chunks.append(ray.put(chunk))
        return chunks

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The gathered weights on rank 0 ({} elsewhere); every rank must call this at once."""
        with self.full_weights():
            if self.rank != 0:
                return {}
            return {name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters()}

    def save_checkpoint(self, state: checkpoint.RunState) -> str:
        """Write checkpoint step_<N> with the driver's run state (every rank at once); returns its folder."""
        state = copy.copy(state)
        checkpoint.capture_rngs(state)
        run_dir = Path(self.config.train.run_dir)
        folder = checkpoint.save(
            self.engine, run_dir, state, config_to_dict(self.config), self.rank, self.config.train.keep_checkpoints
        )
        return str(folder)


class RolloutWorker:
    """Full inference weights of ThinkingLM; samples thoughts for the micro-batches it is handed."""

    def __init__(self, config: Config, index: int) -> None:
        self.config, self.index = config, index
        self.version = -1  # no weights from the learner yet
        _quiet_logging(f"rollout-{index}")

    def setup(self) -> None:
        """Load the model in the compute dtype that model.dtype resolves to on this actor's device."""
        configure_cpu_allocator(self.config.model)
        self.config = with_resolved_dtype(self.config)
        dtype = torch.bfloat16 if self.config.model.dtype == "bfloat16" else torch.float32
        model, _ = build_thinking_lm(self.config.model.name, self.config.thought, self.config.train.seed)
        self.model = model.to(_device(), dtype).eval()
        self.params = dict(self.model.named_parameters())

    def load_weights(self, chunk_refs: list[ray.ObjectRef], version: int) -> int:
        """Copy published weight chunks in, one chunk in memory at a time; returns the new version."""
        loaded = 0
        for ref in chunk_refs:
            for name, tensor in ray.get(ref, timeout=self.config.train.step_timeout_s).items():
                self.params[name].data.copy_(tensor)
                loaded += 1
        if loaded != len(self.params):
            raise RuntimeError(f"rollout-{self.index}: got {loaded} of {len(self.params)} weight tensors")
        self.version = version
        return version

    def sample(self, batch: dict[str, torch.Tensor]) -> ThoughtBatch:
        """Thoughts for one micro-batch, sampled with the weights last loaded, on CPU for the object store."""
        kill_at(f"rollout_v{self.version}", once_marker=Path(self.config.train.run_dir) / f".fault_v{self.version}")
        batch = {k: v.to(_device()) for k, v in batch.items()}
        think = self.config.loss.objective == "quiet_star"
        return rollout(self.model, batch, self.config.train.seed, self.version, think=think).to("cpu")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current inference weights (what tests compare with the learner's)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}
