"""A private Ray cluster for tests: `ray start --head --block` on loopback, its own temp dir and ports, stopped
by killing exactly the processes that belong to it (never `ray stop`, which would stop every Ray on the
machine)."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qstar_rl.engine import free_port

BIN = Path(sys.executable).parent


def cluster_env(**extra: str) -> dict[str, str]:
    dropped = ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "WANDB_API_KEY")
    base = {k: v for k, v in os.environ.items() if k not in dropped}
    return {
        **base,
        "PATH": f"{BIN}:{base.get('PATH', '')}",  # `python` in a job entrypoint is this virtual environment's
        "PYTHONWARNINGS": "ignore",
        "DS_ACCELERATOR": "cpu",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind to loopback only
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",  # loopback only; token mode would write ~/.ray/auth_token
        **extra,
    }


class LocalRayCluster:
    def __init__(self, num_cpus: int) -> None:
        # Short path: Ray's Unix sockets live under it and must stay below ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="qray", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.process = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=true",
            ],
            env=cluster_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_until_jobs_api_answers(timeout=120)

    def _wait_until_jobs_api_answers(self, timeout: float) -> None:
        from urllib.error import HTTPError
        from urllib.request import urlopen

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(self.temp_dir) / 'head.log').read_text()[-3000:]}")
            try:
                with urlopen(f"{self.dashboard}/api/version", timeout=2):
                    return
            except HTTPError:  # it answers (401 when Ray's token authentication is on)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError("the Ray head did not come up")

    def stop(self) -> None:
        """Kill this cluster's processes: everything in the session `ray start` began (its agents rename
        themselves, e.g. `ray::DashboardAgent`, so their command line no longer names the cluster), and anything
        whose command line names this cluster's temp dir or port (raylet, GCS, dashboard, workers)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._own_pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2 if sig == signal.SIGTERM else 0)
        self.process.wait(timeout=30)
        self.log.close()

    def _own_pids(self) -> list[int]:
        pids = []
        marks = (self.temp_dir.encode(), f":{self.port}".encode())
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                session = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
            except (OSError, IndexError, ValueError):
                continue
            if any(mark in cmdline for mark in marks) or session == self.process.pid:
                pids.append(int(entry.name))
        return pids
