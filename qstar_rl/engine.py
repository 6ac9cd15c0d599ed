"""Plumbing: process group, optimizer, schedule and the DeepSpeed ZeRO-3 engine.

Reads only RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, so one code path serves the
`deepspeed` launcher, torchrun, Ray actors and a plain single process (which gets a 1-rank gloo group on
loopback). `PlainEngine` offers the DeepSpeed engine's small interface on one process without DeepSpeed.
"""

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from qstar_rl.config import Config, ModelConfig
from qstar_rl.loading import build_thinking_lm
from qstar_rl.model import ThinkingLM


def choose_deepspeed_accelerator() -> None:
    """DeepSpeed picks its accelerator when first imported: the CPU one here unless CUDA is present (else it
    probes for hardware this machine lacks). Call before importing deepspeed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


choose_deepspeed_accelerator()  # every DeepSpeed import in this project goes through this module's functions


BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""x86 CPU flags (as /proc/cpuinfo names them) of native bf16 matrix instructions: AVX512-BF16 (Zen 4+, Cooper
Lake, Sapphire Rapids) and AMX-BF16 (Sapphire Rapids+). oneDNN uses them for bf16 matmuls, about twice fp32's speed
(measured on Zen 4: 214 vs 99 GFLOP/s per thread); without them bf16 is converted to fp32 and is slower."""


def cpu_flags() -> frozenset[str]:
    """This machine's x86 CPU flags from /proc/cpuinfo (empty where there is none, e.g. macOS, or no flags line).

    torch.backends.cpu.get_cpu_capability() only tells the vector width it dispatches to ('AVX512' on Zen 4 with
    or without AVX512-BF16), so it cannot tell whether bf16 matmuls are native."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def bf16_pays(device: torch.device, flags: Iterable[str] | None = None) -> bool:
    """Whether bf16 compute beats fp32 on `device`: a CUDA GPU with native bf16 (Ampere or later; emulated bf16 on
    older GPUs is slower than fp32), or a CPU with native bf16 matmuls (`flags`, default this machine's, contains
    one of BF16_CPU_FLAGS). Anything else (other accelerators, ARM CPUs, whose bf16 speed depends on the build)
    stays fp32: set model.dtype explicitly there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return not BF16_CPU_FLAGS.isdisjoint(cpu_flags() if flags is None else flags)
    return False


GLIBC_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
"""Environment variables that set glibc's allocator; where one is set, `keep_freed_memory_for_reuse` leaves it be."""


def keep_freed_memory_for_reuse(device: torch.device | None = None, environ: dict[str, str] | None = None) -> bool:
    """On a CPU under glibc, serve tensors up to 1 GiB from the heap and never hand freed memory back to the
    kernel; returns whether it did. By default glibc mmaps every block over its (adaptive, <= 32 MiB) threshold
    and trims freed heap tops, so each step faults in, zero-filled, pages that the previous step just returned:
    a (512, 49,152) fp32 log-softmax took 124 ms instead of 55, and a default SmolLM2 step ran 1.2-1.9x slower
    on 2 cores (bench/step_cost.py measures the ratio). The price: the resident set stays at its high-water mark,
    and the heap keeps its fragments: ~10% above what weights, optimizer state and live tensors need in a plain
    step, but with activation checkpointing far more (SmolLM2 at T=1024 in fp32: 14.9 GB resident against a
    live peak of 3.8 GB; 6.4 and 13.9 GB in two runs under glibc's defaults; bench/allocators.py), hence
    `resolve_cpu_allocator`. Nothing changes on a GPU (host allocations are rare), with another C library, or
    where the user set one of GLIBC_MALLOC_VARIABLES (their choice wins)."""
    import ctypes
    import platform

    environ = os.environ if environ is None else environ
    on_cpu = not torch.cuda.is_available() if device is None else device.type == "cpu"
    if not on_cpu or any(name in environ for name in GLIBC_MALLOC_VARIABLES):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
"""jemalloc keeps freed pages for reuse (no purging), as 'reuse' does under glibc, yet under activation
checkpointing it held about half of what glibc's kept heap did (bench/allocators.py)."""


def jemalloc_library() -> Path | None:
    """The jemalloc that Ray's Linux wheels ship (ray/core/libjemalloc.so), or None where there is none."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if sys.platform != "linux" or spec is None or spec.origin is None:
        return None
    library = Path(spec.origin).parent / "core" / "libjemalloc.so"
    return library if library.is_file() else None


def jemalloc_loaded() -> bool:
    """Whether jemalloc serves this process's allocations (it was preloaded at start)."""
    maps = Path("/proc/self/maps")
    return maps.is_file() and "libjemalloc" in maps.read_text()


def resolve_cpu_allocator(model: ModelConfig, on_gpu: bool, environ: Mapping[str, str] | None = None) -> str:
    """model.cpu_allocator made concrete: 'reuse', 'glibc' or 'jemalloc'. 'auto' is 'reuse' (fastest), except
    with activation checkpointing, where glibc's kept heap fragments (SmolLM2 at T=1024: 13.0 GB resident in
    bf16, 14.9 in fp32) and where jemalloc holds ~half that at reuse's speed (bench/allocators.py): 'jemalloc'
    where Ray ships it, else 'glibc'. On a GPU (few host allocations) or where the user set LD_PRELOAD or one of
    GLIBC_MALLOC_VARIABLES (their choice wins; a preloaded jemalloc is ours), 'auto' is 'glibc': nothing changes."""
    environ = os.environ if environ is None else environ
    if model.cpu_allocator != "auto":
        return model.cpu_allocator
    preloads = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    users_own = any("libjemalloc" not in preload for preload in preloads)
    if on_gpu or users_own or any(name in environ for name in GLIBC_MALLOC_VARIABLES):
        return "glibc"
    if not model.gradient_checkpointing:
        return "reuse"
    return "jemalloc" if jemalloc_library() is not None else "glibc"


def cpu_allocator_environment(model: ModelConfig, on_gpu: bool, environ: Mapping[str, str] | None = None) -> dict:
    """The variables a process must start with for model.cpu_allocator (jemalloc is preloaded: a running process
    cannot switch to it): LD_PRELOAD (ours first) and MALLOC_CONF (unless the user set one); {} when nothing is
    needed, jemalloc is missing, or `environ` already preloads it."""
    environ = os.environ if environ is None else environ
    library = jemalloc_library()
    if resolve_cpu_allocator(model, on_gpu, environ) != "jemalloc" or library is None:
        return {}
    preloaded = environ.get("LD_PRELOAD", "")
    if str(library) in preloaded.replace(":", " ").split():
        return {}
    return {"LD_PRELOAD": f"{library} {preloaded}".strip(), "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF)}


def restart_with_cpu_allocator(model: ModelConfig) -> None:
    """Where model.cpu_allocator needs jemalloc and this process does not have it, replace this process (same
    pid, same command line, so launchers keep tracking it) with one that preloads it; otherwise return. Only for
    a process started from the command line: anything already done in this process is lost."""
    environment = cpu_allocator_environment(model, on_gpu=torch.cuda.is_available())
    if environment and not jemalloc_loaded():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **environment})


def configure_cpu_allocator(model: ModelConfig, device: torch.device | None = None) -> str:
    """Apply model.cpu_allocator in this process (call it before the model is built); returns the allocator in
    effect: 'jemalloc' (preloaded, see `restart_with_cpu_allocator`), 'reuse' (glibc keeping freed memory, see
    `keep_freed_memory_for_reuse`) or 'glibc' (its own settings)."""
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    if jemalloc_loaded():
        return "jemalloc"
    if resolve_cpu_allocator(model, on_gpu) == "reuse" and keep_freed_memory_for_reuse(device):
        return "reuse"
    return "glibc"


CPU_ALLOCATOR_DESCRIPTIONS = {
    "jemalloc": "jemalloc, freed memory kept for reuse",
    "reuse": "glibc, freed memory kept for reuse",
    "glibc": "glibc's own settings",
}
"""How the trainer's log names the allocator that `configure_cpu_allocator` reports."""


def compute_device() -> torch.device:
    """The device this process computes on (Ray and the launchers make a rank's GPU its current device)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device | None = None, flags: Iterable[str] | None = None) -> str:
    """model.dtype made concrete: 'auto' becomes 'bfloat16' where `bf16_pays` on `device` (default: this process's
    compute device), else 'float32'; 'float32' and 'bfloat16' stay. Call it in the process that computes: under
    Ray, the driver may run on a CPU head node while the learners run on GPUs."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if bf16_pays(device or compute_device(), flags) else "float32"


def with_resolved_dtype(config: Config) -> Config:
    """A copy of config whose model.dtype is resolved on this machine (see `resolve_dtype`)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=resolve_dtype(config.model.dtype)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prebuild_deepspeed_ops() -> None:
    """Compile DeepSpeed's shared-memory comm op into torch's JIT cache now (`make setup` calls this once).

    DeepSpeed's TorchBackend builds that op whenever a process group starts, even at world size 1 where nothing
    uses it, and compiling it takes 20-55 s on 2 cores (more when they are busy); later starts load it from the cache
    (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). Building it here, with DeepSpeed's own function,
    moves that wait to the install instead of the first run, without patching DeepSpeed. Where the accelerator
    has no such op (CUDA) it builds nothing."""
    from deepspeed.comm.torch import build_shm_op

    use_this_environments_ninja()
    build_shm_op()


def use_this_environments_ninja() -> None:
    """Put the `ninja` installed next to this Python (DeepSpeed's dependency) first on PATH, where there is one.

    torch builds and re-checks DeepSpeed's op with the first `ninja` on PATH. With a second ninja on the machine
    (here /usr/bin/ninja 1.11 besides the virtual environment's 1.13), processes that see different PATHs (an
    activated environment, Ray actors, the deepspeed launcher's ranks) use different ninja versions, and each
    switch rebuilt the cached op from scratch (~30 s on 2 cores; 14 rebuilds in one afternoon of tests here)."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); starts the process group (NCCL on GPUs, gloo on CPU) if needed. A
    collective that waits longer than `timeout_s` for another rank raises instead of hanging. Local runs listen
    on no outside interface (see `local_store`)."""
    import deepspeed

    use_this_environments_ninja()  # deepspeed.init_distributed checks (and may build) its shm op
    if "RANK" not in os.environ:  # a plain single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = local_store(world, timeout)
        if store is not None:  # else DeepSpeed starts torch's TCP store from MASTER_ADDR / MASTER_PORT
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world, timeout=timeout
        )
    return rank, world, local


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def local_store(world: int, timeout: datetime.timedelta):
    """The rendezvous store of a run that stays on this machine, or None for one that spans machines. torch's
    TCP store listens on every interface whatever MASTER_ADDR says; one process needs no store at all (an
    in-memory one), and ranks whose MASTER_ADDR is loopback (so all on this host) meet through a file, with
    gloo's and NCCL's own sockets bound to the loopback interface."""
    if world > 1 and not is_loopback(os.environ.get("MASTER_ADDR", "")):
        return None
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if world == 1:
        return dist.HashStore()
    store = dist.FileStore(str(rendezvous_file()), world)
    store.set_timeout(timeout)
    return store


def rendezvous_file() -> Path:
    """The file store of ranks on this host: same launcher (parent) and port, same job; a crashed job's file
    never meets a later one."""
    name = f"qstar-rl-rendezvous-{os.getuid()}-{os.getppid()}-{os.environ.get('MASTER_PORT', '')}"
    return Path(tempfile.gettempdir()) / name


def finish_distributed() -> None:
    """At the end of a run: wait for every rank, then rank 0 removes the rendezvous file (if any)."""
    if dist.is_initialized():
        barrier()
        if dist.get_rank() == 0:
            rendezvous_file().unlink(missing_ok=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (identity on one process); returns a new tensor on the input's device."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.clone()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = tensor.detach().to(device).clone()
    dist.all_reduce(out)
    return out.to(tensor.device)


def broadcast_from_rank0(obj: object) -> object:
    """Rank 0's `obj` on every rank (picklable; identity on one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_collective_timeout(err: BaseException) -> bool:
    """Whether `err` is a collective giving up on another rank (gloo / NCCL timeouts, a peer gone)."""
    text = str(err).lower()
    return "timed out" in text or "timeout" in text or peer_disconnected(err)


def peer_disconnected(err: BaseException) -> bool:
    """Whether a failed collective saw another rank's connection close (the rank died) rather than time out."""
    text = str(err).lower()
    return "connection closed" in text or "connection reset" in text


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


def make_optimizer(
    model: ThinkingLM, config: Config
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `param_groups` and its `lr_multiplier` schedule (the same for ZeRO-3 and PlainEngine). Fused
    where torch has the kernel: one pass over each tensor's memory per step instead of one per Adam operation
    (ZeRO-3 steps whole flat partitions, as large as the model)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, config), lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2), fused=True
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config))


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


ONE_RANK_ZERO3 = {
    # At one rank ZeRO-3 "gathers" a parameter as a view of the rank's own partition (no copy, no extra memory),
    # so releasing parameters after use saves nothing: keep every one resident, and the per-module fetch/release
    # bookkeeping has nothing to do.
    "stage3_param_persistence_threshold": 2**62,
    # Before releasing a module's parameters ZeRO-3 scans the recorded module trace ahead for reuses, up to this
    # many parameters. With the shipped 1e9 that scan covers the whole trace (the rollout's M decode steps make it
    # long) at every release: quadratic, and redone whenever the trace is recorded anew (SmolLM2's steps 2 and 3
    # took 22-24 s instead of 14 s in bench/zero3_tax.py). There is no gather to save by reusing at one rank.
    "stage3_max_reuse_distance": 0,
    "stage3_prefetch_bucket_size": 0,  # every parameter is resident: nothing to prefetch
    # At one rank "reducing" a gradient is a copy into this rank's partition. The reduce bucket is allocated whole
    # (the shipped 5e7 elements are 191 MiB in fp32), and contiguous_gradients would copy each gradient into it
    # first: a small bucket, gradients copied once.
    "reduce_bucket_size": 10**7,
    "contiguous_gradients": False,
    "overlap_comm": False,  # no communication to overlap (on GPUs it would add a side stream and its buffers)
    # DeepSpeed's own Linear autograd function re-gathers partitioned weights in backward; with every weight
    # resident it is only a Python layer around matmul at each of the hundreds of linear calls of a step.
    "memory_efficient_linear": False,
}
"""ZeRO-3 settings for world size 1 (`deepspeed_config`), where ZeRO-3 has nobody to partition with: they remove
what the multi-rank machinery costs there (bench/zero3_tax.py measures it against a plain torch AdamW)."""


def one_rank_zero3(zero: dict) -> dict:
    """A zero_optimization section with ONE_RANK_ZERO3 applied. With offload_param the parameters are meant to
    live in CPU memory between uses, so residency and the re-gathering Linear stay as configured."""
    settings = dict(ONE_RANK_ZERO3)
    if (zero.get("offload_param") or {}).get("device", "none") != "none":
        for key in ("stage3_param_persistence_threshold", "memory_efficient_linear"):
            settings.pop(key)
    return {**zero, **settings}


def deepspeed_batch_settings(config: Config, world_size: int) -> dict[str, int | float]:
    """The DeepSpeed JSON keys that come from this config (the one place they are decided)."""
    micro = config.train.micro_batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": config.train.global_batch_size // (micro * world_size),
        "train_batch_size": config.train.global_batch_size,
        "gradient_clipping": config.optim.grad_clip,
    }


def deepspeed_json_problems(config: Config, world_size: int) -> list[str]:
    """What is wrong with the DeepSpeed JSON for this config (missing, not an object, not ZeRO-3, batch keys that
    disagree with the config, its own optimizer); [] otherwise."""
    t = config.train
    batch_ok = (
        min(t.micro_batch_size, t.global_batch_size, world_size) >= 1
        and t.global_batch_size % (t.micro_batch_size * world_size) == 0
    )
    path = Path(config.deepspeed.config)
    if not path.is_file():
        return [f"deepspeed.config: no such file {path}"]
    try:
        ds = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        return [f"deepspeed.config: {path} is not valid JSON ({type(err).__name__}: {err})"]
    if not isinstance(ds, dict):
        return [f"deepspeed.config: {path} must hold a JSON object at the top level, got {type(ds).__name__}"]
    problems = []
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        problems.append(f"deepspeed.config: {path} has no zero_optimization section")
    elif zero.get("stage", 0) != 3:
        problems.append(
            f"deepspeed.config: {path} asks for ZeRO stage {zero.get('stage', 0)!r}; qstar-rl runs ZeRO stage 3"
        )
    if batch_ok:  # the values below are only meaningful when the batch sizes divide
        for key, want in deepspeed_batch_settings(config, world_size).items():
            have = ds.get(key, "auto")
            if have != "auto" and have != want:
                problems.append(
                    f"deepspeed.config: {path} sets {key}={have!r} but the config implies {want!r} "
                    '(set it to "auto" or remove it: the config fills it)'
                )
    if "optimizer" in ds or "scheduler" in ds:
        problems.append(
            f"deepspeed.config: {path} defines optimizer/scheduler; they come from the optim section of the config"
        )
    return problems


def deepspeed_config(
    config: Config, world_size: int, ds_json: dict | None = None, load_universal: bool = False
) -> dict:
    """The DeepSpeed JSON (read from deepspeed.config unless given) with batch sizes, clipping and
    precision filled from the config (the one place they are decided), and at world size 1 the ZeRO-3 settings
    of `one_rank_zero3` (more ranks get the JSON's ZeRO knobs). `load_universal`: the engine will load a
    universal checkpoint (one written at another world size, see checkpoint.load)."""
    ds = dict(ds_json) if ds_json is not None else json.loads(Path(config.deepspeed.config).read_text())
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    ds.update(deepspeed_batch_settings(config, world_size))
    ds["bf16"] = {"enabled": resolve_dtype(config.model.dtype) == "bfloat16"}  # fp32 master weights either way
    ds.pop("fp16", None)
    if world_size == 1:
        ds["zero_optimization"] = one_rank_zero3(ds.get("zero_optimization", {}))
    return ds


@contextlib.contextmanager
def comm_threads_single_threaded() -> Iterator[None]:
    """Run DeepSpeed's setup with one torch thread. A thread takes torch's thread count at its first parallel
    op; for gloo's worker threads that is DeepSpeed's parameter broadcast at initialize. With more than one they
    start a second OpenMP team, libgomp then counts more threads than cores and stops spin-waiting for work
    (throttled spin count), so every parallel op of the trainer pays a futex wake-up: on 2 cores small ops ran
    10-15x slower and a SmolLM2 step 1.3x slower, for the rest of the process. The collectives' copies are
    memory-bound; one thread costs them nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_deepspeed_engine(
    model: ThinkingLM, config: Config, world_size: int, ds_json: dict | None = None, load_universal: bool = False
):
    """(engine, full_weights) where full_weights() gathers every partitioned ZeRO-3 parameter for rollout."""
    import deepspeed

    optimizer, scheduler = make_optimizer(model, config)
    with comm_threads_single_threaded():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(config, world_size, ds_json, load_universal),
        )
    # Persistent parameters are never released (ZeRO-3 keeps them whole on every rank); gathering them here
    # would release them at the exit, and the learner's next forward would gather each one again.
    partitioned = [p for p in model.parameters() if not getattr(p, "ds_persist", False)]
    if world_size == 1 and not partitioned:
        drop_one_rank_zero3_overheads(engine)

    def full_weights() -> contextlib.AbstractContextManager:
        # One gather for the whole rollout instead of one per layer at each of the M decode steps.
        if not partitioned:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)

    return engine, full_weights


def drop_one_rank_zero3_overheads(engine) -> None:
    """At one rank with every parameter resident (ONE_RANK_ZERO3), remove three costs that ZeRO-3 pays for nothing:
    - its per-module forward/backward hooks, which fetch and release parameters that are always there: Python
      calls around each of the thousands of module calls of a step (SmolLM2 rollout 2.0 s -> 1.7 s). The
      gradient hooks, which reduce gradients into the optimizer's partition, stay.
    - the fp32 master copy of fp32 weights. DeepSpeed means to share it (stage3 `_create_fp32_partitions`: "we
      don't need another copy of the weights") but compares a torch.device with a device string, which is never
      equal, so it clones: one more copy of the model. The copy's storage becomes the weights' own (same dtype,
      same device, same elements: the update DeepSpeed writes back is then a copy onto itself).
    - the gradient "reduction" (`copy_gradients_into_partitions`) and the flattening of the reduced gradients
      before the update (`step_on_gradient_partitions`)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    optimizer = engine.optimizer
    optimizer.parameter_offload._remove_module_hooks()
    params = list(engine.module.parameters())

    def keep_resident(module, args) -> None:
        # What the removed hooks still did at one rank: gather parameters that DeepSpeed released outside a
        # step (initialization, checkpoint save/load). After a step every one is resident again: a scan, no copy.
        released = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if released:
            released[0].all_gather(param_list=released)

    keep_resident(None, None)
    engine.module.lm.register_forward_pre_hook(keep_resident)
    groups = zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat, strict=True)
    for weights, master in groups:
        if (weights.dtype, weights.device) == (master.dtype, master.device) and weights.data_ptr() != master.data_ptr():
            master.data = weights.data
    copy_gradients_into_partitions(optimizer)
    step_on_gradient_partitions(optimizer)


_REDUCE_BUCKET = "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads"


def copy_gradients_into_partitions(optimizer) -> bool:
    """At one rank, reduce each bucket of gradients by copying (or, accumulating micro-batches, adding) them into
    the optimizer's fp32 gradient partitions: DeepSpeed's own path concatenates the bucket into a new buffer,
    divides it by the world size 1, reduce-scatters it over a one-rank group (another copy) and only then copies
    it into the partitions: three passes over every gradient where one does (SmolLM2: 0.9 s of `torch.cat` alone
    in a 33 s step at one thread). Returns whether it applies; not with DeepSpeed versions that lack the method
    it replaces (their own path runs, slower and the same), gradient pre-division or ZenFlow."""
    if (
        not hasattr(type(optimizer), _REDUCE_BUCKET)
        or not hasattr(optimizer, "partition_grads")
        or dist.get_world_size() != 1
        or getattr(optimizer, "gradient_predivide_factor", 1.0) != 1.0
        or getattr(optimizer, "zenflow", False)
    ):
        return False

    @torch.no_grad()
    def reduce_bucket(communication_data_type: torch.dtype) -> None:
        bucket = optimizer.ipg_buckets[communication_data_type]
        if not bucket.params:
            return
        grads = [p.grad.view(-1) for p in bucket.params]  # the sum over one rank is the gradient itself
        optimizer.partition_grads(bucket.params, grads)  # copies or accumulates, casting; frees each p.grad
        bucket.params.clear()
        bucket.elements = 0
        bucket.process_group = None

    setattr(optimizer, _REDUCE_BUCKET, reduce_bucket)
    return True


_PREPARE_FP32_GRAD = "_prepare_fp32_grad_for_sub_group"


def step_on_gradient_partitions(optimizer) -> bool:
    """Let the optimizer update each fp32 master partition with its gradient where ZeRO-3 already keeps it, one
    contiguous slice of its flat gradient buffer, instead of a flattened copy. DeepSpeed's step concatenates the
    list of per-parameter views of that slice into a new tensor for every sub-group: a copy of every gradient
    into a second gradient-sized allocation (SmolLM2-135M fp32: 517 MiB, and 0.84 s of `torch.cat` in a 19 s step
    at 2 threads). With bf16 gradients the slice is cast to fp32 in one pass (DeepSpeed concatenates, then
    casts). An fp32 update clips the slice in place, which nothing reads afterwards: the next backward overwrites
    it (DeepSpeed resets its micro-step at every step, so the first micro-batch copies, not adds). Returns
    whether it applies: not with optimizer offload (gradients live elsewhere there) or DeepSpeed versions without
    the method or the buffer it relies on; a sub-group whose gradients are not that one slice (a parameter
    without gradient gets a fresh zero tensor) takes DeepSpeed's own path."""
    if (
        not hasattr(type(optimizer), _PREPARE_FP32_GRAD)
        or getattr(optimizer, "grad_partitions_flat_buffer", None) is None
        or getattr(optimizer, "offload_optimizer", True)
        or dist.get_world_size() != 1
    ):
        return False
    flatten_and_prepare = getattr(optimizer, _PREPARE_FP32_GRAD)

    def prepare(sub_group_id: int) -> None:
        grads = optimizer.averaged_gradients[sub_group_id]
        master = optimizer.fp32_partitioned_groups_flat[sub_group_id]
        span = contiguous_span(optimizer.grad_partitions_flat_buffer, grads)
        if span is None or span.numel() != master.numel():
            flatten_and_prepare(sub_group_id)
            return
        master.grad = span if span.dtype == master.dtype else span.to(master.dtype)  # bf16 gradients: one cast
        optimizer.averaged_gradients[sub_group_id] = None

    setattr(optimizer, _PREPARE_FP32_GRAD, prepare)
    return True


def contiguous_span(buffer: torch.Tensor, views: list[torch.Tensor]) -> torch.Tensor | None:
    """The slice of the 1-D `buffer` that the 1-D `views` tile back to back, in order; None if they do not."""
    if buffer.dim() != 1 or not buffer.is_contiguous() or not views:
        return None
    base = buffer.untyped_storage().data_ptr()
    start = offset = views[0].storage_offset() - buffer.storage_offset()
    for view in views:
        if (
            view.dim() != 1
            or view.dtype != buffer.dtype
            or not view.is_contiguous()
            or view.untyped_storage().data_ptr() != base
            or view.storage_offset() - buffer.storage_offset() != offset
        ):
            return None
        offset += view.numel()
    if start < 0 or offset > buffer.numel():
        return None
    return buffer.narrow(0, start, offset - start)


def build_thinking_engine(config: Config, world_size: int, ds_json: dict | None = None, load_universal: bool = False):
    """(model, tokenizer, engine, full_weights): the configured LM wrapped in ThinkingLM under ZeRO-3."""
    model, tokenizer = build_thinking_lm(
        config.model.name, config.thought, config.train.seed, gradient_checkpointing=config.model.gradient_checkpointing
    )
    engine, full_weights = make_deepspeed_engine(model, config, world_size, ds_json, load_universal)
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
        self.optimizer, self.lr_scheduler = make_optimizer(model, config)
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

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        """DeepSpeed's signature: <save_dir>/<tag>/plain.pt with weights, optimizer, schedule and step count."""
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "global_steps": self.global_steps,
        }
        torch.save(state, folder / "plain.pt")

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        """DeepSpeed's signature; loads with weights_only (a crafted pickle is refused, never run)."""
        state = torch.load(Path(load_dir) / tag / "plain.pt", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        self.global_steps = state["global_steps"]

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]
