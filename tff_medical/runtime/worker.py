"""TFF's C++ worker, started so that only this process can reach it, and dying with us.

What TFF's own launcher gets wrong and how this one fixes it: docs/DESIGN.md.
"""

import atexit
import glob
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from absl import logging
import grpc
import portpicker

from tff_medical import processes
from tff_medical.errors import RuntimeIsolationError

_STARTUP_TIMEOUT_SEC = 120.0
_GRPC_MAX_MESSAGE_LENGTH_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_CHANNEL_OPTIONS = [
    ('grpc.max_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ('grpc.max_receive_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ('grpc.max_send_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
]
_TCP_LISTEN_STATE = '0A'
# sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
_MAX_UNIX_PATH_BYTES = 107
_SOCKET_NAME = 'worker.sock'
_LOG_NAME = 'worker.log'


def loopback_shim_path() -> str:
  """Path of the compiled bind shim; raises if the package was installed without it."""
  here = os.path.dirname(os.path.abspath(__file__))
  candidates = sorted(glob.glob(os.path.join(here, '_loopback_bind*.so')))
  if not candidates:
    raise RuntimeIsolationError(
        'The loopback shim for the TFF worker is not built, so the worker would listen on all '
        'interfaces. Reinstall the package (make install, or pip install -e .) with a C compiler.'
    )
  return candidates[0]


def worker_binary_path() -> str:
  import tensorflow_federated  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.dirname(tensorflow_federated.__file__), 'data', 'worker_binary')
  if not os.path.isfile(path):
    raise RuntimeIsolationError(f'TFF worker binary not found at {path}.')
  return path


def inet_listeners(pid: int) -> list[str]:
  """'address:port' (hex, as in /proc/net) of every TCP listening or UDP socket `pid` holds."""
  inodes = set()
  try:
    for fd in os.listdir(f'/proc/{pid}/fd'):
      try:
        target = os.readlink(f'/proc/{pid}/fd/{fd}')
      except OSError:
        continue  # Closed while we looked.
      if target.startswith('socket:['):
        inodes.add(target[len('socket:['):-1])
  except OSError:
    return []
  found = []
  for table in ('/proc/net/tcp', '/proc/net/tcp6', '/proc/net/udp', '/proc/net/udp6'):
    try:
      with open(table) as f:
        lines = f.readlines()[1:]
    except OSError:
      continue
    for line in lines:
      fields = line.split()
      listening = 'udp' in table or fields[3] == _TCP_LISTEN_STATE
      if listening and fields[9] in inodes:
        found.append(fields[1])
  return found


def make_private_dir() -> str:
  """A new directory only our uid may enter, short enough to hold the worker's socket path."""
  directory = tempfile.mkdtemp(prefix='tff_medical_worker_')  # mkdtemp creates it 0700.
  if len(os.path.join(directory, _SOCKET_NAME).encode()) > _MAX_UNIX_PATH_BYTES:
    # A long TMPDIR (some batch systems set one) cannot hold a socket path; /tmp can.
    os.rmdir(directory)
    directory = tempfile.mkdtemp(prefix='tff_medical_worker_', dir='/tmp')
  return directory


def open_private_log(path: str) -> int:
  """A new owner-only file at `path`; a file or symlink already there is an error, never used."""
  return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def check_private_dir(directory: str) -> None:
  """Raises unless `directory` is a real directory of ours that no other uid may enter."""
  info = os.lstat(directory)
  if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or
      stat.S_IMODE(info.st_mode) & 0o077):
    raise RuntimeIsolationError(
        f'The TFF worker\'s socket directory {directory} is not private to this user (mode '
        f'{stat.S_IMODE(info.st_mode):o}); refusing to send it data.')


class LocalWorker:
  """One TFF C++ worker process, reachable through a private Unix socket, owned by this process."""

  def __init__(self, max_concurrent_computation_calls: int = -1):
    self._max_calls = max_concurrent_computation_calls
    self._process: Optional[subprocess.Popen] = None
    self._stub = None
    self._channel: Optional[grpc.Channel] = None
    self._lock = threading.Lock()
    self.directory: Optional[str] = None
    self.log_path: Optional[str] = None

  @property
  def pid(self) -> Optional[int]:
    return self._process.pid if self._process is not None else None

  @property
  def socket_path(self) -> Optional[str]:
    return os.path.join(self.directory, _SOCKET_NAME) if self.directory else None

  def running(self) -> bool:
    return self._process is not None and self._process.poll() is None

  def start(self) -> None:
    with self._lock:
      if self.running():
        return
      self._stop_locked()  # A worker that died since: keep its log, say where.
      from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub  # pylint: disable=g-import-not-at-top

      binary, shim = worker_binary_path(), loopback_shim_path()
      self.directory = make_private_dir()
      self.log_path = os.path.join(self.directory, _LOG_NAME)
      # The worker still needs a --port; the shim binds a Unix socket in its place, so the number
      # only has to differ from other ports the worker might bind.
      port = portpicker.pick_unused_port()
      env = dict(os.environ)
      env['LD_PRELOAD'] = ':'.join(p for p in (shim, env.get('LD_PRELOAD')) if p)
      env['TFF_MEDICAL_WORKER_PORT'] = str(port)
      env['TFF_MEDICAL_WORKER_SOCKET'] = self.socket_path
      env['TFF_MEDICAL_PARENT_PID'] = str(os.getpid())  # The shim arms PR_SET_PDEATHSIG.
      log = open_private_log(self.log_path)
      try:
        process = subprocess.Popen(
            [binary, f'--port={port}', f'--max_concurrent_computation_calls={self._max_calls}'],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, close_fds=True)
      except OSError:
        self._remove_directory(keep_log=False)
        raise
      finally:
        os.close(log)
      self._process = process
      self._channel = grpc.insecure_channel(f'unix:{self.socket_path}', _GRPC_CHANNEL_OPTIONS)
      stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(self._channel)
      deadline = time.monotonic() + _STARTUP_TIMEOUT_SEC
      while not stub.is_ready:
        if inet_listeners(process.pid):
          # The shim did not take the port (not preloaded?); say so now, not after the timeout.
          self._check_confined()
        if process.poll() is not None:
          self._fail_locked(f'TFF worker exited with code {process.returncode} at start')
        if time.monotonic() > deadline:
          self._fail_locked('TFF worker did not start')
        time.sleep(0.2)
      self._check_confined()
      self._stub = stub
      logging.info('TFF worker pid %d on %s', process.pid, self.socket_path)

  def _check_confined(self) -> None:
    """Before any data is sent: no inet listener, and a socket only our uid can reach."""
    exposed = inet_listeners(self._process.pid)
    if exposed:
      self._fail_locked(f'TFF worker listens on inet sockets {exposed}; refusing to send it data')
    try:
      check_private_dir(self.directory)
      info = os.lstat(self.socket_path)
    except (OSError, RuntimeIsolationError) as e:
      self._fail_locked(str(e))
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
      self._fail_locked(f'{self.socket_path} is not a socket of this user')

  def _fail_locked(self, message: str) -> None:
    """Stops the worker, keeps its log for the reader, and raises."""
    self._stop_locked(keep_log=True)
    raise RuntimeIsolationError(f'{message.rstrip(".")}; its log is {self.log_path}.')

  def stub(self):
    if self._stub is None or not self.running() or not self._stub.is_ready:
      self._stub = None
      self.stop()
      self.start()
    return self._stub

  def stop(self) -> None:
    with self._lock:
      self._stop_locked()

  def _stop_locked(self, keep_log: bool = False) -> None:
    process, self._process, self._stub = self._process, None, None
    if self._channel is not None:
      self._channel.close()  # Else it keeps trying to reconnect to a socket that is gone.
      self._channel = None
    if process is not None and process.poll() is None:
      processes.terminate(process)
    elif process is not None and not keep_log:
      # It ended before we asked it to: a crash whose log is worth keeping.
      keep_log = True
      logging.warning('TFF worker pid %d ended by itself (code %s); its log is %s',
                      process.pid, process.returncode, self.log_path)
    self._remove_directory(keep_log)

  def _remove_directory(self, keep_log: bool) -> None:
    directory, self.directory = self.directory, None
    if directory is None:
      return
    if keep_log:
      try:
        os.unlink(os.path.join(directory, _SOCKET_NAME))
      except OSError:
        pass  # Never created, or already gone.
    else:
      shutil.rmtree(directory, ignore_errors=True)


_worker: Optional[LocalWorker] = None


def current_worker() -> Optional[LocalWorker]:
  return _worker


def install_execution_context(default_num_clients: int = 0) -> LocalWorker:
  """Makes TFF run computations on a confined worker, started now from this thread.

  Call once from the main thread before the first computation (entry points and the test
  suite do). Idempotent.
  """
  global _worker
  if _worker is not None and _worker.running():
    return _worker
  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.backends.native import compiler
  from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
  from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
  from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
  from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
  from tensorflow_federated.python.core.impl.executors import remote_executor
  from tensorflow_federated.python.core.impl.types import placements
  # pylint: enable=g-import-not-at-top

  worker = LocalWorker()
  worker.start()

  def stack_fn(cardinalities):
    if cardinalities.get(placements.CLIENTS) is None:
      cardinalities[placements.CLIENTS] = default_num_clients
    executor = remote_executor.RemoteExecutor(worker.stub())
    executor.set_cardinalities(cardinalities)
    return executor

  context = sync_execution_context.SyncExecutionContext(
      executor_fn=python_executor_stacks.ResourceManagingExecutorFactory(
          executor_stack_fn=stack_fn),
      compiler_fn=compiler.desugar_and_transform_to_native,
      transform_args=tensorflow_computation.transform_args,
      transform_result=tensorflow_computation.transform_result,
  )
  context_stack_impl.context_stack.set_default_context(context)
  _worker = worker
  atexit.register(shutdown)
  return worker


def shutdown() -> None:
  """Stops the worker and leaves TFF without a default context (idempotent).

  Entry points call this in a finally block. Clearing the default context also drops the one
  TFF installs at import: a computation after shutdown raises instead of silently starting
  TFF's own, unconfined worker, and that context is not left for interpreter teardown (whose
  cleanup of it prints an ignored exception).
  """
  global _worker
  if _worker is not None:
    _worker.stop()
    _worker = None
  if 'tensorflow_federated' in sys.modules:
    from tensorflow_federated.python.core.impl.context_stack import set_default_context  # pylint: disable=g-import-not-at-top
    set_default_context.set_no_default_context()
