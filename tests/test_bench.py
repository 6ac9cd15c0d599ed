"""The benchmark scripts run end to end (small sizes); the sampling one's parallel and naive tokens agree; the
statistics they report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import median_interval  # noqa: E402


def run_quick(script: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run bench/<script> --quick; returns the process and its JSON results."""
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_thoughts_benchmark_quick(tmp_path):
    proc, result = run_quick("thoughts.py", tmp_path)
    assert result["sampling"] and all(row["same_tokens"] for row in result["sampling"])
    assert len(result["scoring"]) == 3 and all(row["peak_mib"] > 0 for row in result["scoring"])
    assert "parallel vs naive" in proc.stdout


@pytest.mark.slow
def test_ray_steps_benchmark_quick(tmp_path):
    proc, result = run_quick("ray_steps.py", tmp_path)
    assert [row["mode"] for row in result["phases"]] == ["ray", "deepspeed"]  # colocated: full run only
    assert all(row["step"] > 0 and row["weight_sync"] > 0 for row in result["phases"])
    assert [row["phase"] for row in result["ratios"]] == ["rollout", "learn", "weight_sync", "step"]
    assert "Ray step relative to the colocated steps" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator and /proc")
def test_allocators_benchmark_quick(tmp_path):
    """Every variant runs a measured step (jemalloc preloaded from Ray's wheel); 'glibc' hands big blocks back,
    so after a step its heap holds far less free memory than 'reuse', which keeps everything."""
    proc, result = run_quick("allocators.py", tmp_path)
    variants = result["variants"]
    assert list(variants) == ["reuse", "glibc", "mmap4", "jemalloc"]
    for variant in variants.values():
        assert [row["step"] for row in variant["rows"]] == ["built", 1, 2]
        assert all(row["seconds"] > 0 and row["VmHWM"] >= row["VmRSS"] > 0 for row in variant["rows"][1:])
    assert variants["jemalloc"]["rows"][-1]["heap"] == 0  # glibc's heap unused: jemalloc served everything
    assert "peak resident MiB" in proc.stdout


def test_median_interval_is_the_order_statistics_that_cover_the_median_with_95_percent():
    # n=16: P(Binomial(16, 1/2) <= 3) = 697/65536 = 0.011 <= 0.025 < P(<= 4) = 0.038, so the 4th smallest and
    # the 4th largest of the values (here shuffled)
    values = [float(v) for v in (7, 3, 15, 1, 9, 12, 4, 16, 2, 10, 6, 14, 5, 11, 8, 13)]
    assert median_interval(values) == (4.0, 13.0)
    assert median_interval(values, confidence=0.5) == (7.0, 10.0)  # P(<= 6) = 0.23 <= 0.25 < P(<= 7) = 0.40
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # P(<= 0) = 1/32 > 0.025: no interval from 5
    assert median_interval([float(v) for v in range(6)]) == (0.0, 5.0)  # 1/64 <= 0.025: the extremes
