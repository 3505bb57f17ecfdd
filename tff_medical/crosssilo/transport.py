"""Mutual TLS and node authentication around Flower 1.12's SuperLink, driver and SuperNode.

Why Flower alone does not check client certificates, and how we make it: docs/DESIGN.md.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Optional

import grpc

from tff_medical import processes
from tff_medical.crosssilo import identity
from tff_medical.crosssilo import provisioning as pki
from tff_medical.errors import ConfigError


def _read(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    raise ConfigError(f'credential file must exist. Found none at {path}.') from None


def require_client_certificates() -> None:
  """In a SuperLink process: every TLS server it creates demands a CA-signed client cert."""
  original = grpc.ssl_server_credentials
  if getattr(original, '_tff_medical_mtls', False):
    return

  def ssl_server_credentials(private_key_certificate_chain_pairs, root_certificates=None,
                             require_client_auth=False):
    del require_client_auth
    if root_certificates is None:
      raise ConfigError('the SuperLink must be given the CA (--ssl-ca-certfile) to require '
                        'client certificates. Found none.')
    return original(private_key_certificate_chain_pairs, root_certificates=root_certificates,
                    require_client_auth=True)

  ssl_server_credentials._tff_medical_mtls = True  # pylint: disable=protected-access
  grpc.ssl_server_credentials = ssl_server_credentials


def channel_credentials(party_dir: str) -> grpc.ChannelCredentials:
  """TLS credentials trusting only our CA and presenting the party's own certificate."""
  return grpc.ssl_channel_credentials(
      root_certificates=_read(os.path.join(party_dir, pki.CA_CERT)),
      private_key=_read(os.path.join(party_dir, pki.KEY)),
      certificate_chain=_read(os.path.join(party_dir, pki.CERT)))


def present_client_certificate(site_dir: str) -> None:
  """In a site process: Flower's Fleet connection presents the site's certificate.

  Flower 1.12's grpc-rere connection builds its channel with flwr.common.grpc.create_channel,
  which has no client-certificate option; we substitute a version that has one.
  """
  from flwr.client.grpc_rere_client import connection  # pylint: disable=g-import-not-at-top
  from flwr.common import grpc as flwr_grpc  # pylint: disable=g-import-not-at-top

  credentials = channel_credentials(site_dir)

  def create_channel(server_address, insecure, root_certificates=None,
                     max_message_length=flwr_grpc.GRPC_MAX_MESSAGE_LENGTH, interceptors=None):
    if insecure:
      raise ConfigError('a site must connect with TLS. Found an insecure connection request.')
    del root_certificates  # Ours (the CA in the site folder) are in `credentials`.
    options = [('grpc.max_send_message_length', max_message_length),
               ('grpc.max_receive_message_length', max_message_length)]
    channel = grpc.secure_channel(server_address, credentials, options=options)
    if interceptors is not None:
      channel = grpc.intercept_channel(channel, interceptors)
    return channel

  connection.create_channel = create_channel


def make_driver(coordinator_dir: str, address: str):
  """A flwr GrpcDriver to the SuperLink's Driver API that presents the coordinator's cert."""
  from flwr.proto.driver_pb2_grpc import DriverStub  # pylint: disable=g-import-not-at-top
  from flwr.server.driver.grpc_driver import GrpcDriver  # pylint: disable=g-import-not-at-top

  class MtlsDriver(GrpcDriver):

    def _connect(self) -> None:
      if self._is_connected:
        return
      self._channel = grpc.secure_channel(self._addr, channel_credentials(coordinator_dir))
      self._grpc_stub = DriverStub(self._channel)

  return MtlsDriver(run_id=0, driver_service_address=address,
                    root_certificates=_read(os.path.join(coordinator_dir, pki.CA_CERT)))


def create_run(driver) -> int:
  """Registers one Flower run on the SuperLink and points the driver at it."""
  from flwr.proto.run_pb2 import CreateRunRequest  # pylint: disable=g-import-not-at-top

  res = driver._stub.CreateRun(CreateRunRequest(fab_id='tff_medical/crosssilo',  # pylint: disable=protected-access
                                                fab_version='1'))
  driver._run_id = res.run_id  # pylint: disable=protected-access
  driver._run = None  # pylint: disable=protected-access
  return int(res.run_id)


def _die_with_parent() -> None:
  """In the SuperLink child between fork and exec: the kernel kills it when we die
  (PR_SET_PDEATHSIG), so no SuperLink outlives its coordinator."""
  ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


class SuperLink:
  """The coordinator's SuperLink process: mTLS, node auth, in-memory state; dies with us."""

  def __init__(self, pki_dir: str, fleet_address: str, driver_address: str, log_path: str,
               storage_dir: str):
    coordinator = os.path.join(pki_dir, pki.COORDINATOR_DIR)
    for name in (pki.CA_CERT, pki.CERT, pki.KEY, pki.AUTH_KEY, pki.AUTH_PUBLIC_KEY,
                 pki.ENROLLED_SITES):
      _read(os.path.join(coordinator, name))
    self.coordinator_dir = coordinator
    self.fleet_address = fleet_address
    self.driver_address = driver_address
    self.log_path = log_path
    self.identity_path = os.path.join(storage_dir, identity.IDENTITY_FILE)
    self._args = [
        sys.executable, '-m', 'tff_medical.crosssilo.superlink',
        '--identity-file', self.identity_path,
        '--ssl-ca-certfile', os.path.join(coordinator, pki.CA_CERT),
        '--ssl-certfile', os.path.join(coordinator, pki.CERT),
        '--ssl-keyfile', os.path.join(coordinator, pki.KEY),
        '--auth-list-public-keys', os.path.join(coordinator, pki.ENROLLED_SITES),
        '--auth-superlink-private-key', os.path.join(coordinator, pki.AUTH_KEY),
        '--auth-superlink-public-key', os.path.join(coordinator, pki.AUTH_PUBLIC_KEY),
        '--driver-api-address', driver_address,
        '--fleet-api-address', fleet_address,
        '--storage-dir', storage_dir,
    ]
    self._process: Optional[subprocess.Popen] = None

  def start(self, timeout: float = 60.0) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
    if os.path.exists(self.identity_path):  # A previous SuperLink's nodes are gone.
      os.unlink(self.identity_path)
    with open(self.log_path, 'ab') as log:
      self._process = subprocess.Popen(
          self._args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
          env=dict(os.environ, FLWR_TELEMETRY_ENABLED='0'),
          preexec_fn=_die_with_parent, close_fds=True)
    driver_host, driver_port = self.driver_address.rsplit(':', 1)
    deadline = time.monotonic() + timeout
    credentials = channel_credentials(self.coordinator_dir)
    while True:
      if self._process.poll() is not None:
        raise ConfigError(f'the SuperLink must start. It exited with code '
                          f'{self._process.returncode}; see {self.log_path}.')
      channel = grpc.secure_channel(f'{driver_host}:{driver_port}', credentials)
      try:
        grpc.channel_ready_future(channel).result(timeout=1.0)
        return
      except grpc.FutureTimeoutError:
        pass
      finally:
        channel.close()
      if time.monotonic() > deadline:
        self.stop()
        raise ConfigError(f'the SuperLink must start within {timeout:g} s. It did not; see '
                          f'{self.log_path}.')

  def identities(self) -> dict[int, str]:
    """{node id: site} of the connected nodes that proved their enrolled key (see identity)."""
    return identity.read_identities(self.identity_path)

  def running(self) -> bool:
    return self._process is not None and self._process.poll() is None

  def stop(self) -> None:
    process, self._process = self._process, None
    if process is None or process.poll() is not None:
      return
    processes.terminate(process)
