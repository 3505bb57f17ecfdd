"""The TFF worker takes work only from the process that started it, and never outlives it."""

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

from tff_medical.errors import RuntimeIsolationError
from tff_medical.runtime import worker as worker_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child that starts the worker, runs a computation, prints the worker's pid and socket, then
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
    print('WORKER', w.pid, w.socket_path, flush=True)
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


def _start_child(mode: str) -> tuple[subprocess.Popen, int, str]:
  child = subprocess.Popen([sys.executable, '-c', _CHILD, mode], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in child.stdout:
    if line.startswith('WORKER'):
      _, pid, socket_path = line.split()
      return child, int(pid), socket_path
  child.wait()
  pytest.fail(f'child exited with {child.returncode} before starting a worker')


# HTTP/2's client preface and an empty SETTINGS frame: what any gRPC client sends first.
_H2_PREFACE = b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + b'\x00\x00\x00\x04\x00\x00\x00\x00\x00'


# Connects to the worker's socket as argv[1]: the interpreter starts as us (it lives where another
# uid cannot exec it), drops to that user before touching the socket, and prints what it got.
_PROBE = textwrap.dedent("""
    import os, pwd, socket, sys
    entry = pwd.getpwnam(sys.argv[1])
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    assert os.getuid() == entry.pw_uid
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
      s.settimeout(20)
      try:
        s.connect(sys.argv[2])
      except PermissionError:
        print('denied')
        sys.exit()
      try:
        s.sendall(PREFACE)
        header = s.recv(9)
      except OSError:
        header = b''
      print('served' if len(header) == 9 and header[3] == 0x04 else 'closed')
""").replace('PREFACE', repr(_H2_PREFACE))


def _probe_as(user: str, socket_path: str) -> str:
  """What a process of `user` gets when it opens a gRPC connection to the worker's socket.

  'served': the worker answered with its HTTP/2 SETTINGS frame (from there a computation can be
  sent, as TFF's own client does); 'denied': connect() was refused; 'closed': the connection was
  accepted and dropped.
  """
  result = subprocess.run([sys.executable, '-c', _PROBE, user, socket_path], capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.strip()


@pytest.fixture
def own_worker():
  """A worker of this test alone, for tests that loosen or break it."""
  worker = worker_lib.LocalWorker()
  worker.start()
  yield worker
  worker.stop()


def test_worker_has_no_tcp_port_and_a_private_socket(tff_context):
  """The attack began with the port in /proc/net/tcp6; now no inet listener exists at all."""
  assert tff_context.running()
  assert worker_lib.inet_listeners(tff_context.pid) == []
  directory = os.path.dirname(tff_context.socket_path)
  assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
  assert os.stat(directory).st_uid == os.geteuid()
  assert stat.S_ISSOCK(os.lstat(tff_context.socket_path).st_mode)


def test_inet_listener_is_detected():
  """The /proc check itself can fail: a socket bound to all interfaces is reported."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('0.0.0.0', 0))
    s.listen()
    port_hex = f'{s.getsockname()[1]:04X}'
    assert f'00000000:{port_hex}' in worker_lib.inet_listeners(os.getpid())


def test_another_local_user_cannot_reach_the_worker(tff_context):
  """Finding 1 of issue 14, replayed: user nobody tries the worker's endpoint, the owner too."""
  assert _probe_as('nobody', tff_context.socket_path) == 'denied'
  assert _probe_as(pwd.getpwuid(os.geteuid()).pw_name, tff_context.socket_path) == 'served'
  assert tff_context.running()


def test_another_uid_is_dropped_even_if_the_directory_were_opened(own_worker):
  """The second lock: with the directory and socket opened to all, the shim still drops a
  connection from another uid (SO_PEERCRED) while serving the owner; and the check made before
  any data is sent refuses such a directory."""
  os.chmod(own_worker.directory, 0o755)
  os.chmod(own_worker.socket_path, 0o777)
  assert _probe_as('nobody', own_worker.socket_path) == 'closed'
  assert _probe_as(pwd.getpwuid(os.geteuid()).pw_name, own_worker.socket_path) == 'served'
  with pytest.raises(RuntimeIsolationError, match='not private'):
    worker_lib.check_private_dir(own_worker.directory)


def test_log_is_private_and_removed_at_stop():
  worker = worker_lib.LocalWorker()
  worker.start()
  try:
    directory, log_path = worker.directory, worker.log_path
    assert os.path.dirname(log_path) == directory
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600
    for fd in (1, 2):  # The worker's stdout and stderr are that file.
      assert os.readlink(f'/proc/{worker.pid}/fd/{fd}') == log_path
  finally:
    worker.stop()
  assert not os.path.exists(directory)


def test_symlink_at_the_old_log_path_is_not_followed(tmp_path):
  """The log used to be /tmp/tff_medical_worker_<pid>.log, opened for append through links."""
  target = tmp_path / 'victim'
  target.write_bytes(b'untouched')
  planted = os.path.join(tempfile.gettempdir(), f'tff_medical_worker_{os.getpid()}.log')
  os.symlink(target, planted)
  worker = worker_lib.LocalWorker()
  try:
    worker.start()
    assert worker.log_path != planted
  finally:
    worker.stop()
    os.unlink(planted)
  assert target.read_bytes() == b'untouched'


def test_log_is_never_opened_through_a_symlink(tmp_path):
  target = tmp_path / 'victim'
  target.write_bytes(b'untouched')
  link = tmp_path / 'worker.log'
  os.symlink(target, link)
  with pytest.raises(FileExistsError):
    worker_lib.open_private_log(str(link))
  assert target.read_bytes() == b'untouched'


def test_failed_start_keeps_the_log_and_names_it(tmp_path, monkeypatch):
  fake = tmp_path / 'worker_binary'
  fake.write_text('#!/bin/sh\necho "worker could not start" >&2\nexit 3\n')
  fake.chmod(0o700)
  monkeypatch.setattr(worker_lib, 'worker_binary_path', lambda: str(fake))
  worker = worker_lib.LocalWorker()
  with pytest.raises(RuntimeIsolationError, match='code 3') as raised:
    worker.start()
  try:
    assert worker.log_path in str(raised.value)
    with open(worker.log_path) as f:
      assert 'worker could not start' in f.read()
    assert not os.path.exists(os.path.join(os.path.dirname(worker.log_path), 'worker.sock'))
  finally:
    shutil.rmtree(os.path.dirname(worker.log_path))


def test_worker_that_died_keeps_its_log(own_worker):
  os.kill(own_worker.pid, signal.SIGKILL)
  deadline = time.monotonic() + 15
  while own_worker.running() and time.monotonic() < deadline:  # Until it can be reaped.
    time.sleep(0.1)
  log_path = own_worker.log_path
  own_worker.stop()
  try:
    assert os.path.exists(log_path)
  finally:
    shutil.rmtree(os.path.dirname(log_path))


@pytest.mark.slow  # End-to-end tier: a fresh interpreter with its own worker, ended this way.
@pytest.mark.parametrize('mode', ['exit', 'error'])
def test_no_worker_left_after_normal_end_or_error(mode):
  child, pid, socket_path = _start_child(mode)
  child.stdout.read()  # Returns only when every holder of the pipe has closed it.
  child.wait(timeout=60)
  assert (child.returncode == 0) == (mode == 'exit')
  assert _wait_gone(pid), f'worker {pid} outlived its parent ({mode})'
  assert not os.path.exists(os.path.dirname(socket_path)), 'the log and socket stay behind'


@pytest.mark.slow  # End-to-end tier: a fresh interpreter with its own worker, ended this way.
@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_no_worker_left_after_kill(sig):
  child, pid, socket_path = _start_child('wait')
  assert _alive(pid)
  assert worker_lib.inet_listeners(pid) == []
  assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
  child.send_signal(sig)
  child.wait(timeout=60)
  assert _wait_gone(pid), f'worker {pid} outlived its parent (signal {sig})'
  if sig == signal.SIGINT:  # Python ends through atexit, which removes the worker's directory.
    assert not os.path.exists(os.path.dirname(socket_path))
  else:  # Python ends without running any code: the private directory is left behind.
    shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)


@pytest.mark.slow  # End-to-end tier: a fresh interpreter with its own worker, ended this way.
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


@pytest.mark.slow  # End-to-end tier: a fresh interpreter with its own worker, ended this way.
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
