"""What every benchmark here shares: peak-memory measurement, fresh-subprocess points, tables and result files."""

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from qstar_rl.config import ModelConfig

RESULTS = Path(__file__).parent / "results"

MEASURING_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1", "PYTHONWARNINGS": "ignore"}
"""Large blocks mmapped and one arena: freed tensors leave the resident set at once, so the peak resident set
size follows the peak of live tensors."""


def use_the_trainers_cpu_allocator(model: ModelConfig) -> None:
    """What `qstar-rl train` does with model.cpu_allocator before it builds a model: restart
    this process under jemalloc where that is wanted (a --point process restarts with its own command line),
    then apply the rest (engine.configure_cpu_allocator)."""
    from qstar_rl.engine import configure_cpu_allocator, restart_with_cpu_allocator

    restart_with_cpu_allocator(model)
    configure_cpu_allocator(model)


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (now) or VmHWM (the high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> int:
    """Restart the peak-memory counter; returns the level it counts from, in bytes: on CPU the resident set
    (its high-water mark reset through /proc/self/clear_refs), on GPU the allocator's allocated bytes."""
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kib("VmRSS") * 1024


def peak() -> int:
    """The peak in bytes since `reset_peak` (subtract what it returned for the growth)."""
    _sync()
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss_kib("VmHWM") * 1024


def run_point(script: str, spec: dict, env: dict[str, str] | None = None, measuring: bool = True) -> dict:
    """Run `script --point SPEC_JSON` in a fresh single process (no inherited rank variables; the measuring
    allocator settings unless `measuring` is False, for timing; plus `env`) and return the JSON object its
    last output line holds."""
    full_env = {**os.environ, **(MEASURING_ENV if measuring else {"PYTHONWARNINGS": "ignore"}), **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        full_env.pop(key, None)
    cmd = [sys.executable, script, "--point", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, check=False, cwd=Path(script).parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"point {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """A right-aligned text table of `columns` of `rows` (floats with 3 decimals), under `title`."""
    cells = [[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    for line in [columns, *cells]:
        print(" | ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def cpu_model() -> str:
    """The CPU's model name and whether it has native bf16 matmuls (from /proc/cpuinfo; '' where there is none)."""
    from qstar_rl.engine import BF16_CPU_FLAGS, cpu_flags

    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    name = next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")), "")
    native = sorted(BF16_CPU_FLAGS & cpu_flags())
    return f"{name} (native bf16: {', '.join(native) or 'none'})" if name else ""


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of `values` (independent draws): the k-th smallest
    and k-th largest value, k the largest with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2, so it covers the
    median with at least `confidence`. None when n is too small for any such k (n < 6 at 95%)."""
    n = len(values)
    tail = (1 - confidence) / 2
    below = 0.0  # P(Binomial(n, 1/2) < k)
    k = 0
    while k < n and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def write_results(path: str | Path, **sections) -> None:
    """Write a benchmark's results as JSON, with the machine they were measured on."""
    machine = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"machine": machine, **sections}, indent=2))
    print(f"\nwrote {path}")
