"""A site's process: a Flower SuperNode with our ClientApp, mutual TLS and node authentication.

How it connects and when it exits: docs/DESIGN.md.
"""

import dataclasses
import enum
import os
import time
from typing import Callable, Optional

from absl import logging
import numpy as np

from tff_medical.crosssilo import provisioning as pki
from tff_medical.crosssilo import secagg
from tff_medical.crosssilo import site_worker
from tff_medical.crosssilo import transport
from tff_medical.data import source as source_lib
from tff_medical.errors import ConfigError

# Flower SuperNodes ping every ~20 s and are declared gone 30 s after the last ping. A site that
# dies mid-round would hold every stage of the round for that long; 10 s lets the coordinator
# move on with the survivors sooner.
PING_INTERVAL_SECONDS = 10.0


class Fault(enum.Enum):
  """Test hooks: how a site misbehaves (`none` for every real site)."""

  NONE = 'none'
  CRASH = 'crash'  # dies abruptly while training in round `fault_round`
  NAN = 'nan'  # sends NaN in every round (bypassing the local sanitizing)
  HUGE = 'huge'  # sends 1e30 / -inf values in every round


@dataclasses.dataclass
class SiteResult:
  rounds: int
  joined: bool


def _tamper(fault: Fault) -> Optional[Callable[[np.ndarray], np.ndarray]]:
  if fault is Fault.NAN:
    return lambda v: np.full_like(v, np.nan)
  if fault is Fault.HUGE:
    return lambda v: np.where(np.arange(v.size) % 2 == 0, 1e30, -np.inf).astype(v.dtype)
  return None


STATE_DIR = 'state'


def run_site(site_dir: str, coordinator_address: str, images: source_lib.LabeledImages, *,
             site_seed: int = 0, max_wait_seconds: float = 300.0, fault: Fault = Fault.NONE,
             fault_round: int = 0, state_dir: str = '') -> SiteResult:
  """Serves rounds until the coordinator has been unreachable for `max_wait_seconds`.

  state_dir: where the site keeps its example-level ledger per run (default site_dir/state);
  keep it with the site's other records: losing it would restart the site's budget, so the
  coordinator then leaves the site out of that run.

  Raises:
    ConfigError: missing credentials.
  """
  os.environ['FLWR_TELEMETRY_ENABLED'] = '0'  # Nothing leaves a site but the protocol.
  for name in (pki.CA_CERT, pki.CERT, pki.KEY, pki.AUTH_KEY, pki.AUTH_PUBLIC_KEY):
    if not os.path.isfile(os.path.join(site_dir, name)):
      raise ConfigError(f'site_dir must hold the files from provisioning ({name}). Found none '
                        f'in {site_dir}.')
  # pylint: disable=g-import-not-at-top
  from flwr.client.app import start_client_internal
  from flwr.client.grpc_rere_client import connection
  # pylint: enable=g-import-not-at-top
  connection.PING_DEFAULT_INTERVAL = PING_INTERVAL_SECONDS
  transport.present_client_certificate(site_dir)
  worker = site_worker.SiteWorker(images, site_seed, tamper=_tamper(fault),
                                  site_name=pki.site_name_of(site_dir),
                                  state_dir=state_dir or os.path.join(site_dir, STATE_DIR))

  def fit(weights, config):
    if fault is Fault.CRASH and int(config.get(site_worker.KEY_ROUND, 0)) == fault_round:
      logging.warning('Fault injection: crashing in round %d.', fault_round)
      os._exit(17)  # pylint: disable=protected-access
    return worker.fit(weights, config)

  app = secagg.make_site_app(fit, worker.report)
  keys = (pki.load_private_key(os.path.join(site_dir, pki.AUTH_KEY)),
          pki.load_public_key(os.path.join(site_dir, pki.AUTH_PUBLIC_KEY)))
  with open(os.path.join(site_dir, pki.CA_CERT), 'rb') as f:
    ca = f.read()
  joined = False
  while True:
    started = time.monotonic()
    before = worker.rounds_done
    try:
      start_client_internal(
          server_address=coordinator_address, node_config={},
          load_client_app_fn=lambda *_: app, root_certificates=ca, insecure=False,
          transport='grpc-rere', authentication_keys=keys, max_wait_time=max_wait_seconds)
      # A normal return means SIGINT/SIGTERM: Flower has already said goodbye to the SuperLink.
      return SiteResult(worker.rounds_done, joined or worker.rounds_done > 0)
    except Exception as e:  # pylint: disable=broad-except
      # Flower raises the last connection error once it gives up reconnecting.
      logging.warning('Coordinator unreachable for %.0f s (%s).', time.monotonic() - started,
                      type(e).__name__)
    joined = joined or worker.rounds_done > before
    if worker.rounds_done == before:
      # Nothing done in a whole attempt: the run is over, or we are not let in.
      return SiteResult(worker.rounds_done, joined)
