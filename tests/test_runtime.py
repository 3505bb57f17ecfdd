"""The TFF worker is confined to loopback and never outlives the process that started it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tff_medical.runtime import worker as worker_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child that starts the worker, runs a computation, prints the worker's pid and port, then
# behaves as argv[1] says: exit normally, raise, or wait to be killed.
_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    import tensorflow_federated as tff
    from tff_medical import runtime
    w = runtime.install_execution_context()
    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def mean(x):
      return tff.federated_mean(x)
    assert mean([1.0, 3.0]) == 2.0
    print('WORKER', w.pid, w.port, flush=True)
    if sys.argv[1] == 'error':
      raise RuntimeError('boom')
    if sys.argv[1] == 'wait':
      time.sleep(600)
""")


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split()[2] != 'Z'
  except FileNotFoundError:
    return False


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if not _alive(pid):
      return True
    time.sleep(0.1)
  return False


def _start_child(mode: str) -> tuple[subprocess.Popen, int, int]:
  child = subprocess.Popen([sys.executable, '-c', _CHILD, mode], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in child.stdout:
    if line.startswith('WORKER'):
      _, pid, port = line.split()
      return child, int(pid), int(port)
  child.wait()
  pytest.fail(f'child exited with {child.returncode} before starting a worker')


def test_worker_listens_on_loopback_only(tff_context):
  addresses = worker_lib.listening_addresses(tff_context.port)
  assert addresses, 'the worker should be listening'
  assert set(addresses) <= worker_lib._LOOPBACK_HEX, addresses


def test_wildcard_listener_is_detected_as_exposed():
  """The /proc check itself can fail: a socket bound to all interfaces is reported as such."""
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('0.0.0.0', 0))
    s.listen()
    addresses = worker_lib.listening_addresses(s.getsockname()[1])
  assert addresses == ['00000000']
  assert not set(addresses) <= worker_lib._LOOPBACK_HEX


@pytest.mark.parametrize('mode', ['exit', 'error'])
def test_no_worker_left_after_normal_end_or_error(mode):
  child, pid, _ = _start_child(mode)
  child.stdout.read()  # Returns only when every holder of the pipe has closed it.
  child.wait(timeout=60)
  assert (child.returncode == 0) == (mode == 'exit')
  assert _wait_gone(pid), f'worker {pid} outlived its parent ({mode})'


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_no_worker_left_after_kill(sig):
  child, pid, port = _start_child('wait')
  assert _alive(pid)
  assert set(worker_lib.listening_addresses(port)) <= worker_lib._LOOPBACK_HEX
  child.send_signal(sig)
  child.wait(timeout=60)
  assert _wait_gone(pid), f'worker {pid} outlived its parent (signal {sig})'


def test_worker_output_never_reaches_our_stdout():
  """A pipe reader sees EOF when Python ends, though the worker writes logs."""
  result = subprocess.run([sys.executable, '-c', _CHILD, 'exit'], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Starting' not in result.stdout


def test_computations_run_in_the_installed_context(tff_context):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  @tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
  def total(x):
    return tff.federated_sum(x)

  assert total([1, 2, 3]) == 6
  assert tff_context.running()


def test_after_shutdown_computations_refuse_instead_of_starting_tffs_own_worker():
  code = textwrap.dedent("""
      import numpy as np
      import tensorflow_federated as tff
      from tff_medical import runtime
      runtime.shutdown()
      @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
      def mean(x):
        return tff.federated_mean(x)
      try:
        mean([1.0])
      except Exception as e:  # pylint: disable=broad-except
        print('REFUSED', type(e).__name__)
  """)
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert 'REFUSED' in result.stdout, result.stderr[-2000:]
  assert 'Exception ignored' not in result.stderr
