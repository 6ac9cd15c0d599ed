"""The benchmark script runs end to end (small sizes) and its parallel and naive tokens agree."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_thoughts_benchmark_quick(tmp_path):
    out = tmp_path / "thoughts.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "thoughts.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["sampling"] and all(row["same_tokens"] for row in result["sampling"])
    assert len(result["scoring"]) == 3 and all(row["peak_mib"] > 0 for row in result["scoring"])
    assert "parallel vs naive" in proc.stdout
