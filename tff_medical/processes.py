"""Stopping a child process we started: politely first, then for sure."""

import signal
import subprocess

_GRACE_SECONDS = 10


def terminate(process: subprocess.Popen) -> None:
  """SIGTERM, up to 10 s for it to exit, then SIGKILL; returns once it has exited."""
  process.send_signal(signal.SIGTERM)
  try:
    process.wait(timeout=_GRACE_SECONDS)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
