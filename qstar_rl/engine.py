"""Plumbing: process group, optimizer, schedule and the DeepSpeed ZeRO-3 engine.

Reads only RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, so one code path serves the
`deepspeed` launcher, torchrun, Ray actors and a plain single process (which gets a 1-rank gloo group on
loopback). `PlainEngine` offers the DeepSpeed engine's small interface on one process without DeepSpeed.
"""

import contextlib
import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from qstar_rl.config import Config, deepspeed_batch_settings
from qstar_rl.model import ThinkingLM, load_lm

if not torch.cuda.is_available():  # DeepSpeed picks its accelerator at import time
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); starts the process group (NCCL on GPUs, gloo on CPU) if needed."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world)
    return rank, world, local


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (identity on one process); returns a new tensor on the input's device."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.clone()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = tensor.detach().to(device).clone()
    dist.all_reduce(out)
    return out.to(tensor.device)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def param_groups(model: ThinkingLM, config: Config) -> list[dict]:
    """AdamW groups: the meta tokens at lr * embedding_lr_multiplier without decay; matrices with decay;
    biases and norms without."""
    meta = [model.start_embedding, model.end_embedding]
    meta_ids = {id(p) for p in meta}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in meta_ids:
            (decay if _ndim(p) >= 2 else no_decay).append(p)
    lr, wd = config.optim.lr, config.optim.weight_decay
    return [
        {"params": decay, "lr": lr, "weight_decay": wd, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        {"params": meta, "lr": lr * config.thought.embedding_lr_multiplier, "weight_decay": 0.0, "name": "meta"},
    ]


def _ndim(p: torch.nn.Parameter) -> int:
    return len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape


def lr_multiplier(config: Config) -> Callable[[int], float]:
    """Linear warm-up to 1, then constant, linear or cosine decay to 0 at train.steps."""
    warmup, total, schedule = config.optim.warmup_steps, config.train.steps, config.optim.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(config: Config, world_size: int, ds_json: dict | None = None) -> dict:
    """The DeepSpeed JSON (read from deepspeed.config unless given) with batch sizes, clipping and
    precision filled from the config (the one place they are decided)."""
    ds = dict(ds_json) if ds_json is not None else json.loads(Path(config.deepspeed.config).read_text())
    ds.update(deepspeed_batch_settings(config, world_size))
    ds["bf16"] = {"enabled": config.model.dtype == "bfloat16"}
    ds.pop("fp16", None)
    return ds


def make_deepspeed_engine(model: ThinkingLM, config: Config, world_size: int, ds_json: dict | None = None):
    """(engine, full_weights) where full_weights() gathers every ZeRO-3 partition for rollout."""
    import deepspeed

    optimizer = torch.optim.AdamW(
        param_groups(model, config), lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config, world_size, ds_json)
    )
    params = list(model.parameters())

    def full_weights() -> contextlib.AbstractContextManager:
        # One gather for the whole rollout instead of one per layer at each of the M decode steps.
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    return engine, full_weights


def build_thinking_engine(config: Config, world_size: int, ds_json: dict | None = None):
    """(model, tokenizer, engine, full_weights): the configured LM wrapped in ThinkingLM under ZeRO-3."""
    lm, tokenizer = load_lm(config.model.name, seed=config.train.seed)
    if config.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = ThinkingLM(lm, config.thought, tokenizer=tokenizer)
    engine, full_weights = make_deepspeed_engine(model, config, world_size, ds_json)
    return model, tokenizer, engine, full_weights


def partition_report(model: ThinkingLM, rank: int) -> str:
    """How much of the model this rank holds: the evidence that ZeRO-3 really partitions."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return f"ZeRO-3: rank {rank} holds {held} of {total} parameters ({100 * held / total:.1f}%)"


class PlainEngine:
    """One process, no DeepSpeed: AdamW, the same schedule and clipping, gradient accumulation, and a step
    skipped (weights, optimizer and schedule untouched) when the gradient norm is not finite. Same protocol
    as DeepSpeed: backward() and step() on every micro-batch; the update happens at the last one."""

    def __init__(self, model: ThinkingLM, config: Config) -> None:
        self.module = model
        self.optimizer = torch.optim.AdamW(
            param_groups(model, config), lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2)
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(config))
        self.grad_clip = config.optim.grad_clip
        self.accumulation = config.train.global_batch_size // config.train.micro_batch_size
        self.global_steps = 0
        self.micro_steps = 0
        self._grad_norm: float | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        self._grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        if math.isfinite(self._grad_norm):
            self.optimizer.step()
            self.lr_scheduler.step()
            self.global_steps += 1
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]
