"""The benchmark scripts run end to end (small sizes); the sampling one's parallel and naive tokens agree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def run_quick(script: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run bench/<script> --quick; returns the process and its JSON results."""
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def test_thoughts_benchmark_quick(tmp_path):
    proc, result = run_quick("thoughts.py", tmp_path)
    assert result["sampling"] and all(row["same_tokens"] for row in result["sampling"])
    assert len(result["scoring"]) == 3 and all(row["peak_mib"] > 0 for row in result["scoring"])
    assert "parallel vs naive" in proc.stdout


def test_ray_steps_benchmark_quick(tmp_path):
    proc, result = run_quick("ray_steps.py", tmp_path)
    assert [row["mode"] for row in result["phases"]] == ["ray", "deepspeed"]  # colocated: full run only
    assert all(row["step"] > 0 and row["weight_sync"] > 0 for row in result["phases"])
    assert [row["phase"] for row in result["ratios"]] == ["rollout", "learn", "weight_sync", "step"]
    assert "Ray step relative to the colocated steps" in proc.stdout
