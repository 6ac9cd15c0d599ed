"""Fault injection for the end-to-end tests: a process kills itself (SIGKILL) at a named point.

Set QSTAR_RL_KILL_AT=<point> in the environment of a run. Points:
- `checkpoint_midway_<step>`: a checkpoint's engine state is written, its run state and manifest are not;
- `saved_<step>`: checkpoint step_<step> is complete;
- `rollout_v<version>`: a Ray rollout actor is about to sample with the weights of policy version <version>
  (optimizer steps taken; synchronous rollout samples optimizer step s with version s - 1).
Production code only names the points; nothing happens unless the variable names one.
"""

import os
import signal
from pathlib import Path


def kill_at(point: str, once_marker: Path | None = None) -> None:
    """SIGKILL this process when QSTAR_RL_KILL_AT names `point`. With `once_marker`, only the first process to
    get there dies (the marker file remembers), so that a restarted run can go on."""
    if os.environ.get("QSTAR_RL_KILL_AT") != point:
        return
    if once_marker is not None:
        if once_marker.exists():
            return
        once_marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
