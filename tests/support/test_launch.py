"""The test harness itself: a launch that hangs is killed with every process it started."""

from __future__ import annotations

import os
import sys
import time

import pytest
from conftest import launch_env, run_process_group


def test_a_timed_out_launch_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    # a "launcher" that starts a worker and hangs, like accelerate launch with a stuck rank
    code = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(600)")
    with pytest.raises(pytest.fail.Exception, match="timed out after 5s"):
        run_process_group([sys.executable, "-c", code], timeout=5, env=launch_env())
    child = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; reaping by init may take a moment
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"the launcher's child {child} survived the time-out")
