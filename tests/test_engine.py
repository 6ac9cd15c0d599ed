"""engine.py: where model.dtype 'auto' lands, and the DeepSpeed settings that make ZeRO-3 free at one rank."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qstar_rl.config import ModelConfig, load_config
from qstar_rl.engine import (
    BF16_CPU_FLAGS,
    GLIBC_MALLOC_VARIABLES,
    JEMALLOC_CONF,
    ONE_RANK_ZERO3,
    contiguous_span,
    cpu_allocator_environment,
    deepspeed_config,
    jemalloc_library,
    keep_freed_memory_for_reuse,
    resolve_cpu_allocator,
    resolve_dtype,
    use_this_environments_ninja,
    with_resolved_dtype,
)

ROOT = Path(__file__).parents[1]
CPU = torch.device("cpu")


def cpuinfo_has_bf16() -> bool:
    """Read independently of engine.cpu_flags: a 'flags' line of /proc/cpuinfo naming avx512_bf16 or amx_bf16."""
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.is_file() else ""
    return re.search(r"^flags\s*:.*\b(avx512_bf16|amx_bf16)\b", text, flags=re.MULTILINE) is not None


FREED_MEMORY_PROBE = """
import os
import sys
import torch
from pathlib import Path
from qstar_rl.config import load_config
from qstar_rl.engine import configure_cpu_allocator, restart_with_cpu_allocator

print("started", os.getpid(), file=sys.stderr, flush=True)

def rss_mib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

def returned_mib():  # how much of a freed 64 MiB tensor leaves the resident set
    x = torch.ones(16 * 2**20)
    held = rss_mib()
    del x
    return held - rss_mib()

model = load_config(None, sys.argv[1:]).model
restart_with_cpu_allocator(model)  # as `qstar-rl train` does: may start this process over
before = returned_mib()
in_effect = configure_cpu_allocator(model, torch.device("cpu"))
print(os.getpid(), in_effect, before, returned_mib(), returned_mib())
"""


@dataclasses.dataclass
class ProbeResult:
    starts: list[int]
    """Process ids that began the probe (one per start: the same pid twice when it restarted itself)."""
    pid: int
    allocator: str
    """What configure_cpu_allocator reported in effect."""
    before: float
    """MiB of a freed 64 MiB tensor that left the resident set before configure_cpu_allocator ..."""
    after: tuple[float, float]
    """... and (twice) after it."""


def probe_allocator(*overrides: str) -> ProbeResult:
    """Run the probe in a fresh process (none of glibc's variables, no LD_PRELOAD) with config `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in (*GLIBC_MALLOC_VARIABLES, "LD_PRELOAD", "MALLOC_CONF")}
    cmd = [sys.executable, "-c", FREED_MEMORY_PROBE, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("started ")]
    pid, allocator, before, after, again = proc.stdout.split()
    return ProbeResult(starts, int(pid), allocator, float(before), (float(after), float(again)))


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator and /proc")
def test_freed_tensor_memory_stays_in_the_process_for_reuse_on_cpu():
    """glibc returns a freed 64 MiB block to the kernel at once (a step then faults it in again, zero-filled);
    with model.cpu_allocator 'auto' (no checkpointing) or 'reuse' the block stays resident and the next
    allocation reuses it."""
    for overrides in ([], ["model.cpu_allocator=reuse", "model.gradient_checkpointing=true"]):
        result = probe_allocator(*overrides)
        assert result.allocator == "reuse" and len(result.starts) == 1, (overrides, result)
        assert result.before > 56 and max(result.after) < 8, (overrides, result)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator and /proc")
def test_glibc_chosen_hands_freed_memory_back_to_the_kernel():
    result = probe_allocator("model.cpu_allocator=glibc")
    assert result.allocator == "glibc" and len(result.starts) == 1, result
    assert result.before > 56 and min(result.after) > 56, result


@pytest.mark.skipif(jemalloc_library() is None, reason="Ray's wheel ships libjemalloc on Linux only")
def test_with_checkpointing_the_process_restarts_itself_under_jemalloc():
    """'auto' with activation checkpointing wants jemalloc (glibc's kept heap fragments there: 13.0 GB resident
    vs 6.7 under jemalloc for SmolLM2 at T=1024 in bf16); only a fresh process can preload it, so the probe
    starts over (same pid, same command line) and from its first allocation on keeps freed memory for reuse."""
    for overrides in (["model.gradient_checkpointing=true"], ["model.cpu_allocator=jemalloc"]):
        result = probe_allocator(*overrides)
        assert result.allocator == "jemalloc", (overrides, result)
        assert result.starts == [result.pid, result.pid], "restarted once, in place"
        assert result.before < 8 and max(result.after) < 8, (overrides, result)


def test_the_allocator_follows_the_config_the_device_and_the_users_own_settings():
    def resolved(allocator: str, checkpointing: bool, on_gpu: bool = False, **environ: str) -> str:
        model = ModelConfig(cpu_allocator=allocator, gradient_checkpointing=checkpointing)
        return resolve_cpu_allocator(model, on_gpu, environ)

    jemalloc_or_glibc = "jemalloc" if jemalloc_library() is not None else "glibc"
    assert resolved("auto", False) == "reuse" and resolved("auto", True) == jemalloc_or_glibc
    assert resolved("auto", False, on_gpu=True) == "glibc" and resolved("auto", True, on_gpu=True) == "glibc"
    assert resolved("auto", True, LD_PRELOAD="/opt/lib/libtcmalloc.so") == "glibc", "their preload wins"
    assert resolved("auto", True, LD_PRELOAD="/x/libjemalloc.so") == jemalloc_or_glibc, "ours, after a restart"
    for name in GLIBC_MALLOC_VARIABLES:
        assert resolved("auto", False, **{name: "1"}) == "glibc" and resolved("auto", True, **{name: "1"}) == "glibc"
    for allocator in ("reuse", "glibc", "jemalloc"):  # an explicit choice is taken as it is
        assert resolved(allocator, False) == allocator and resolved(allocator, True, on_gpu=True) == allocator


@pytest.mark.skipif(jemalloc_library() is None, reason="Ray's wheel ships libjemalloc on Linux only")
def test_the_jemalloc_environment_puts_ours_first_and_keeps_the_users_settings():
    library = str(jemalloc_library())
    jemalloc = ModelConfig(cpu_allocator="jemalloc")
    assert cpu_allocator_environment(jemalloc, False, {}) == {"LD_PRELOAD": library, "MALLOC_CONF": JEMALLOC_CONF}
    theirs = cpu_allocator_environment(jemalloc, False, {"LD_PRELOAD": "/a/libx.so", "MALLOC_CONF": "narenas:2"})
    assert theirs == {"LD_PRELOAD": f"{library} /a/libx.so", "MALLOC_CONF": "narenas:2"}
    assert cpu_allocator_environment(jemalloc, False, {"LD_PRELOAD": f"/a/libx.so:{library}"}) == {}, "already"
    assert cpu_allocator_environment(ModelConfig(), False, {}) == {}, "'auto' without checkpointing: reuse"


def test_the_allocator_is_left_alone_on_gpus_and_when_the_user_set_it():
    assert not keep_freed_memory_for_reuse(torch.device("cuda"), {})
    for name in GLIBC_MALLOC_VARIABLES:
        assert not keep_freed_memory_for_reuse(CPU, {name: "131072"})


def test_the_op_build_uses_the_ninja_of_this_environment_whatever_path_says(monkeypatch):
    """Every process finds the same ninja first (two versions on one machine rebuilt DeepSpeed's cached op at
    each switch), without adding the directory twice."""
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(bin_dir, "ninja")):
        pytest.skip("no ninja next to this Python")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_this_environments_ninja()
    assert shutil.which("ninja") == os.path.join(bin_dir, "ninja")
    use_this_environments_ninja()
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"


def test_auto_is_bf16_on_this_cpu_exactly_when_proc_cpuinfo_lists_native_bf16():
    expected = "bfloat16" if cpuinfo_has_bf16() else "float32"
    assert resolve_dtype("auto", CPU) == expected
    config = with_resolved_dtype(load_config(None, ["model.dtype=auto"]))
    if not torch.cuda.is_available():  # the process computes on this CPU
        assert config.model.dtype == expected
    assert load_config(None).model.dtype == "auto"  # the default; resolving made a copy


@pytest.mark.parametrize(
    "flags,expected",
    [
        ({"fpu", "avx2", "avx512f", "avx512bw", "avx512_vnni"}, "float32"),  # AVX-512 without BF16 (e.g. Ice Lake)
        ({"avx2", "fma"}, "float32"),
        (set(), "float32"),  # no flags line (e.g. not Linux)
        ({"avx512f", "avx512_bf16"}, "bfloat16"),  # Zen 4, Cooper Lake
        ({"avx512f", "amx_tile", "amx_bf16"}, "bfloat16"),  # Sapphire Rapids
    ],
)
def test_auto_follows_the_cpu_flags(flags, expected):
    assert resolve_dtype("auto", CPU, flags) == expected


def test_explicit_dtypes_are_kept_and_other_devices_stay_fp32():
    for flags in (set(), set(BF16_CPU_FLAGS)):
        assert resolve_dtype("float32", CPU, flags) == "float32"
        assert resolve_dtype("bfloat16", CPU, flags) == "bfloat16"
    assert resolve_dtype("auto", torch.device("meta"), BF16_CPU_FLAGS) == "float32"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepspeed_bf16_follows_the_dtype(dtype):
    config = load_config(None, [f"model.dtype={dtype}"])
    assert deepspeed_config(config, world_size=1)["bf16"] == {"enabled": dtype == "bfloat16"}


def zero_section(path: str) -> dict:
    return json.loads((ROOT / path).read_text())["zero_optimization"]


@pytest.mark.parametrize("path", ["ds_configs/zero3.json", "ds_configs/zero3_test.json"])
def test_one_rank_gets_the_one_rank_zero3_settings_and_more_ranks_the_json(path):
    config = load_config(None, [f"deepspeed.config={path}", "train.global_batch_size=2", "train.micro_batch_size=1"])
    one = deepspeed_config(config, world_size=1)["zero_optimization"]
    assert one == {**zero_section(path), **ONE_RANK_ZERO3}
    assert one["stage"] == 3  # still ZeRO-3
    assert deepspeed_config(config, world_size=2)["zero_optimization"] == zero_section(path)


def test_one_rank_settings_keep_offloaded_parameters_offloaded_and_leave_the_given_json_alone():
    ds_json = json.loads((ROOT / "ds_configs/zero3_offload.json").read_text())
    before = json.dumps(ds_json)
    zero = deepspeed_config(load_config(None), world_size=1, ds_json=ds_json)["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert (
        zero["stage3_param_persistence_threshold"] == ds_json["zero_optimization"]["stage3_param_persistence_threshold"]
    )
    assert "memory_efficient_linear" not in zero
    assert zero["stage3_max_reuse_distance"] == 0 and zero["reduce_bucket_size"] == ONE_RANK_ZERO3["reduce_bucket_size"]
    assert json.dumps(ds_json) == before


def test_contiguous_span_is_the_buffer_slice_that_views_tile_in_order_and_none_otherwise():
    buffer = torch.arange(23, dtype=torch.float32)
    sizes = [5, 1, 0, 7, 3]  # odd sizes, an empty view, starting past the buffer's first element
    offsets = [2 + sum(sizes[:i]) for i in range(len(sizes))]
    views = [buffer.narrow(0, o, n) for o, n in zip(offsets, sizes, strict=True)]
    span = contiguous_span(buffer, views)
    assert span is not None and span.data_ptr() == buffer[2:].data_ptr() and span.numel() == sum(sizes)
    span.mul_(-1)  # a view, not a copy: writing through it writes the views
    assert torch.equal(torch.cat(views), -torch.arange(2, 2 + sum(sizes), dtype=torch.float32))
    gap = [buffer.narrow(0, 0, 3), buffer.narrow(0, 4, 3)]
    out_of_order = [buffer.narrow(0, 3, 3), buffer.narrow(0, 0, 3)]
    elsewhere = [buffer.narrow(0, 0, 3), buffer.clone().narrow(0, 3, 3)]
    strided = [buffer[0:6:2]]
    for views in (gap, out_of_order, elsewhere, strided, [], [torch.zeros(3)]):
        assert contiguous_span(buffer, views) is None
    assert contiguous_span(buffer.view(1, 23), [buffer.narrow(0, 0, 3)]) is None  # the buffer must be 1-D


@pytest.mark.slow
def test_zero3_at_one_rank_trains_like_plain_adamw_and_the_tax_benchmark_runs(tmp_path):
    """bench/zero3_tax.py --quick: ZeRO-3 at one rank (its settings, no module hooks, the fp32 master sharing the
    weights' storage) and PlainEngine take the same steps on the tiny model (same data, thoughts and AdamW
    updates), taking turns in one process. A large learning rate makes every update show in the next loss;
    policy weight 1 keeps the 1e6 of the default config from magnifying rounding."""
    out = tmp_path / "zero3_tax.json"
    cmd = [sys.executable, str(ROOT / "bench" / "zero3_tax.py"), "--quick", "--steps", "3", "--out", str(out)]
    cmd += ["optim.lr=1e-3", "loss.policy_weight=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["engine"]: row for row in result["rows"]}
    assert set(rows) == {"zero3", "plain"}
    losses = rows["plain"]["losses"]
    assert len(losses) == 3  # (at lr 1e-6 instead, step 2's loss differs by 2e-4 relative: the test sees updates)
    assert rows["zero3"]["losses"] == pytest.approx(losses, rel=1e-5)
    assert len(result["paired_ratios"]) == 1  # the engines took turns; one timed step after the 2 warm-up steps
    for key in ("zero3_over_plain_time", "zero3_over_plain_cpu_time", "zero3_over_plain_peak_rss"):
        assert result[key] > 0
    assert all(row["peak_mib"] > 0 and row["step_s"] > 0 for row in rows.values())


def run_one_rank_probe(source: str, *args: str) -> dict:
    """Run a probe script as a fresh single process (no launcher's rank variables), from the repository root;
    returns the JSON object its last output line prints."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-c", source, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


ONE_RANK_PROBE = """
import json, os, sys
from pathlib import Path
import deepspeed
import torch
from qstar_rl.checkpoint import RunState, load, save
from qstar_rl.config import load_config
from qstar_rl.data import WindowStream
from qstar_rl.engine import _PREPARE_FP32_GRAD, _REDUCE_BUCKET, all_reduce_sum, build_thinking_engine, init_distributed
from qstar_rl.learner import train_step
from qstar_rl.loading import load_lm
from qstar_rl.model import ThinkingLM

def threads_named(name):
    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == name for t in os.listdir("/proc/self/task"))

def hooks(model):  # below the top module, where DeepSpeedEngine keeps two of its own
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in list(model.modules())[1:])

torch.set_num_threads(2)
run_dir = sys.argv[1]
config = load_config("qstar_rl/configs/tiny.yaml", [f"train.run_dir={run_dir}"])
lm, tokenizer = load_lm(config.model.name, seed=config.train.seed)
unwrapped_hooks = hooks(ThinkingLM(lm, config.thought, tokenizer=tokenizer))
_, world, _ = init_distributed()
model, tokenizer, engine, full_weights = build_thinking_engine(config, world)
optimizer = engine.optimizer
batches = WindowStream(config.data, tokenizer, seed=0).batches(config.train.micro_batch_size)

def step(n):
    result = train_step(engine, model, [next(batches)], config, n, all_reduce_sum, world, full_weights)
    return result.metrics["loss/total"]

flattened = []  # DeepSpeed's flatten (torch.cat of many tensors) called during a step
flatten = optimizer.flatten
optimizer.flatten = lambda tensors: flattened.append(len(tensors)) or flatten(tensors)
losses = [step(0)]
flattens_in_a_step = list(flattened)
folder = save(engine, Path(run_dir), RunState(step=1), {}, 0, keep=1)
load(engine, folder, 0)  # DeepSpeed releases every parameter here: the next step must find them again
losses.append(step(1))
# a non-finite gradient: DeepSpeed must skip the update (weights and optimizer state untouched)
weight = model.mixing_head.net[0].weight
before = [p.detach().clone() for p in model.parameters()]
hook = weight.register_hook(lambda grad: grad * float("inf"))
skipped = train_step(engine, model, [next(batches)], config, 2, all_reduce_sum, world, full_weights).skipped
hook.remove()
with deepspeed.zero.GatheredParameters(list(model.parameters())):  # the skip path releases them
    untouched = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
print(json.dumps({
    "skipped": skipped,
    "untouched": untouched,
    # each gloo process group runs one TCP loop and 2 worker threads; an OpenMP team that a worker starts adds
    # threads that inherit its name
    "gloo_groups": threads_named("gloo_tcp_loop"),
    "gloo_worker_threads": threads_named("pt_gloo_runloop"),
    "hooks_added": hooks(model) - unwrapped_hooks,
    "master_shares_weights": [w.data_ptr() == m.data_ptr() for w, m in
                              zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat)],
    "gradients_copied_into_partitions": _REDUCE_BUCKET in vars(optimizer),
    "steps_on_gradient_partitions": _PREPARE_FP32_GRAD in vars(optimizer),
    "flattens_in_a_step": flattens_in_a_step,
    "master_gradients_released": all(m.grad is None for m in optimizer.fp32_partitioned_groups_flat),
    "losses": losses,
}))
"""


@pytest.mark.slow
def test_one_rank_zero3_has_no_module_hooks_no_master_copy_no_second_openmp_team_and_skips_inf_gradients(tmp_path):
    """At world size 1 (fp32, tiny model): DeepSpeed's per-module hooks are gone (one pre-hook on the LM keeps the
    parameters resident instead, also after a checkpoint load released them), the fp32 master partitions are the
    weights' own storage, gradients are copied straight into the optimizer's partitions, and DeepSpeed's setup
    started no OpenMP team besides the main thread's (a second one makes libgomp stop spin-waiting: see
    engine.comm_threads_single_threaded). A step with a non-finite gradient
    leaves the weights exactly as they were."""
    probe = run_one_rank_probe(ONE_RANK_PROBE, str(tmp_path / "run"))
    assert probe["hooks_added"] == 1
    assert probe["master_shares_weights"] and all(probe["master_shares_weights"])
    assert probe["gradients_copied_into_partitions"]  # the pinned DeepSpeed has the reduction it replaces
    # ... and the step that flattened the gradients: a step of the one-rank path flattens nothing
    assert probe["steps_on_gradient_partitions"] and probe["flattens_in_a_step"] == []
    assert probe["master_gradients_released"]
    assert probe["gloo_worker_threads"] == 2 * probe["gloo_groups"] > 0
    assert all(math.isfinite(loss) for loss in probe["losses"])
    assert probe["skipped"] and probe["untouched"]  # a non-finite gradient: DeepSpeed skipped the update


GRADIENT_PROBE = """
import json, sys
import torch
from qstar_rl.config import load_config
from qstar_rl.data import WindowStream
from qstar_rl.engine import _PREPARE_FP32_GRAD, all_reduce_sum, build_thinking_engine, init_distributed
from qstar_rl.learner import train_step

torch.set_num_threads(2)
run_dir, dtype = sys.argv[1:]
config = load_config("qstar_rl/configs/tiny.yaml", [f"train.run_dir={run_dir}", f"model.dtype={dtype}"])
_, world, _ = init_distributed()
model, tokenizer, engine, full_weights = build_thinking_engine(config, world)
optimizer = engine.optimizer
step_on_partitions = getattr(optimizer, _PREPARE_FP32_GRAD)
flatten = optimizer.flatten
flattened = []
optimizer.flatten = lambda tensors: flattened.append(len(tensors)) or flatten(tensors)
checks = []

def checked(sub_group_id):
    # what DeepSpeed's own step would give the master: its flattened copy of the gradients, cast to fp32
    master = optimizer.fp32_partitioned_groups_flat[sub_group_id]
    expected = flatten(optimizer.averaged_gradients[sub_group_id]).to(master.dtype)
    step_on_partitions(sub_group_id)
    checks.append({"step": step, "equal": torch.equal(master.grad, expected), "dtype": str(master.grad.dtype),
                   "nonzero": bool(master.grad.abs().sum() > 0)})

setattr(optimizer, _PREPARE_FP32_GRAD, checked)
batches = WindowStream(config.data, tokenizer, seed=0).batches(config.train.micro_batch_size)
for step in range(2):
    train_step(engine, model, [next(batches)], config, step, all_reduce_sum, world, full_weights)
print(json.dumps({"checks": checks, "flattened": flattened,
                  "gradient_dtype": str(optimizer.grad_partitions_flat_buffer.dtype)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_rank_zero3_updates_with_the_gradients_deepspeed_would_have_flattened(dtype, tmp_path):
    """engine.step_on_gradient_partitions at world size 1 (tiny model, two steps): every sub-group's master
    gradient equals DeepSpeed's flattened (and, for bf16 gradients, cast) copy, in fp32, without flattening."""
    probe = run_one_rank_probe(GRADIENT_PROBE, str(tmp_path / "run"), dtype)
    assert probe["gradient_dtype"] == f"torch.{dtype}"  # DeepSpeed keeps gradients in the compute dtype
    assert {c["step"] for c in probe["checks"]} == {0, 1}
    assert all(c["equal"] and c["dtype"] == "torch.float32" for c in probe["checks"])
    # not vacuous: at the second step every sub-group has gradient (at the first, one of the tiny model's
    # sub-groups had an all-zero gradient)
    assert all(c["nonzero"] for c in probe["checks"] if c["step"] == 1)
    assert probe["flattened"] == []
