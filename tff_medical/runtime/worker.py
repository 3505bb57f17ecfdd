"""TFF's C++ worker, started so that it is reachable from this host only and dies with us.

TFF 0.87 runs computations in `worker_binary`, a gRPC server it starts as a child process. As
shipped, that process (a) inherits our stdout, so `python x.py | tail` and CI wait on it forever,
(b) outlives the Python process, and (c) listens on all interfaces without authentication. This
module replaces TFF's launcher (executor_stacks.executor_factory.local_cpp_executor_factory) with
one that fixes all three:
  - the worker's output goes to a log file, never to our stdout or stderr;
  - the kernel kills it when the thread that started it dies (PR_SET_PDEATHSIG), so even a
    `kill -9` of Python leaves nothing behind; a normal exit stops it through atexit;
  - a preloaded shim (loopback_bind.c) turns its wildcard bind into a loopback bind, and the
    listening sockets are checked in /proc before any computation is sent; a worker found
    listening elsewhere is killed and an error raised.
"""

import atexit
import ctypes
import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from absl import logging
import grpc
import portpicker

from tff_medical.errors import RuntimeIsolationError

_PR_SET_PDEATHSIG = 1
_STARTUP_TIMEOUT_SEC = 120.0
_GRPC_MAX_MESSAGE_LENGTH_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_CHANNEL_OPTIONS = [
    ('grpc.max_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ('grpc.max_receive_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ('grpc.max_send_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
]
_TCP_LISTEN_STATE = '0A'
_LOOPBACK_HEX = frozenset({
    '0100007F',  # 127.0.0.1 as /proc/net/tcp writes it (little-endian)
    '00000000000000000000000001000000',  # ::1 in /proc/net/tcp6
})


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


def _die_with_parent() -> None:
  """Runs in the child between fork and exec."""
  libc = ctypes.CDLL('libc.so.6', use_errno=True)
  libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def listening_addresses(port: int) -> list[str]:
  """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on `port`."""
  found = []
  for table in ('/proc/net/tcp', '/proc/net/tcp6'):
    try:
      with open(table) as f:
        lines = f.readlines()[1:]
    except OSError:
      continue
    for line in lines:
      fields = line.split()
      address, port_hex = fields[1].split(':')
      if fields[3] == _TCP_LISTEN_STATE and int(port_hex, 16) == port:
        found.append(address)
  return found


class LocalWorker:
  """One TFF C++ worker process, bound to loopback, owned by this process."""

  def __init__(self, max_concurrent_computation_calls: int = -1):
    self._max_calls = max_concurrent_computation_calls
    self._process: Optional[subprocess.Popen] = None
    self._port: Optional[int] = None
    self._stub = None
    self._lock = threading.Lock()
    self.log_path = os.path.join(tempfile.gettempdir(), f'tff_medical_worker_{os.getpid()}.log')

  @property
  def pid(self) -> Optional[int]:
    return self._process.pid if self._process is not None else None

  @property
  def port(self) -> Optional[int]:
    return self._port

  def running(self) -> bool:
    return self._process is not None and self._process.poll() is None

  def start(self) -> None:
    with self._lock:
      if self.running():
        return
      from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub  # pylint: disable=g-import-not-at-top

      port = portpicker.pick_unused_port()
      env = dict(os.environ)
      env['LD_PRELOAD'] = ':'.join(p for p in (loopback_shim_path(), env.get('LD_PRELOAD')) if p)
      with open(self.log_path, 'ab') as log:
        process = subprocess.Popen(
            [worker_binary_path(), f'--port={port}',
             f'--max_concurrent_computation_calls={self._max_calls}'],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            preexec_fn=_die_with_parent, close_fds=True)
      self._process, self._port = process, port
      channel = grpc.insecure_channel(f'localhost:{port}', _GRPC_CHANNEL_OPTIONS)
      stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)
      deadline = time.monotonic() + _STARTUP_TIMEOUT_SEC
      while not stub.is_ready:
        if process.poll() is not None:
          raise RuntimeIsolationError(
              f'TFF worker exited with code {process.returncode} at start; see {self.log_path}.')
        if time.monotonic() > deadline:
          self._stop_locked()
          raise RuntimeIsolationError(f'TFF worker did not start; see {self.log_path}.')
        time.sleep(0.2)
      self._check_loopback_only()
      self._stub = stub
      logging.info('TFF worker pid %d on 127.0.0.1:%d', process.pid, port)

  def _check_loopback_only(self) -> None:
    addresses = listening_addresses(self._port)
    exposed = [a for a in addresses if a not in _LOOPBACK_HEX]
    if exposed or not addresses:
      self._stop_locked()
      raise RuntimeIsolationError(
          'TFF worker is not confined to loopback (listening on '
          f'{exposed or "nothing visible"}); refusing to send it data.')

  def stub(self):
    if self._stub is None or not self.running() or not self._stub.is_ready:
      self._stub = None
      self.stop()
      self.start()
    return self._stub

  def stop(self) -> None:
    with self._lock:
      self._stop_locked()

  def _stop_locked(self) -> None:
    process, self._process, self._stub = self._process, None, None
    if process is None or process.poll() is not None:
      return
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


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
