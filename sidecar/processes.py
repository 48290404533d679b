"""Stopping a child process within a bound: what the demo does to the sidecar it started, and the
tests to the servers they start."""

from __future__ import annotations

import subprocess


def stop(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """SIGTERM (the process closes what it holds), SIGKILL if it is still there after
    `timeout_s`, and reaped either way. Returns whether it had to be killed."""
    if process.poll() is not None:
        return False
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True
    return False
