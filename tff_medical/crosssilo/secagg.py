"""One secure-aggregation round over Flower's SecAgg+ (coordinator side) and the site's ClientApp.

What the workflow sees, why claimed weights are ignored, when a round is abandoned: docs/DESIGN.md.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Optional

from absl import logging
import numpy as np

from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import (Code, Context, ConfigsRecord, FitIns, GetPropertiesIns, RecordSet,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.common.constant import MessageTypeLegacy
import flwr.common.recordset_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.driver_client_proxy import DriverClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flwr_secaggplus
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from tff_medical.crosssilo import mechanism


@dataclasses.dataclass
class SecureSum:
  vector: np.ndarray  # sum over the contributors of their encoded vectors
  contributors: int
  failures: int
  node_ids: tuple[int, ...] = ()  # the contributors


class _CaptureStrategy(Strategy):
  """Hands every node the same FitIns; keeps the unmasked aggregate instead of applying it."""

  def __init__(self, proxies, fit_ins: FitIns):
    super().__init__()
    self._proxies = proxies
    self._fit_ins = fit_ins
    self.captured: Optional[SecureSum] = None

  def initialize_parameters(self, client_manager):
    return None

  def configure_fit(self, server_round, parameters, client_manager):
    return [(proxy, self._fit_ins) for proxy in self._proxies]

  def aggregate_fit(self, server_round, results, failures):
    if results:
      total = parameters_to_ndarrays(results[0][1].parameters)  # The plain sum: _Workflow.
      if len(total) == 1:
        self.captured = SecureSum(np.asarray(total[0], np.float64), len(results),
                                  len(failures), tuple(int(p.node_id) for p, _ in results))
    return None, {}

  def configure_evaluate(self, server_round, parameters, client_manager):
    return []

  def aggregate_evaluate(self, server_round, results, failures):
    return None, {}

  def evaluate(self, server_round, parameters):
    return None


class _Workflow(SecAggPlusWorkflow):
  """SecAgg+ whose training stage may wait longer than the key-exchange stages."""

  def __init__(self, *args, train_timeout: Optional[float] = None, **kwargs):
    super().__init__(*args, **kwargs)
    self._train_timeout = train_timeout

  def collect_masked_vectors_stage(self, driver, context, state):
    key_timeout, self.timeout = self.timeout, self._train_timeout
    try:
      return super().collect_masked_vectors_stage(driver, context, state)
    finally:
      self.timeout = key_timeout

  def unmask_stage(self, driver, context, state):
    """Flower's unmasking, with the weight total replaced by one quantization range: the
    workflow's scale factor is then 1 and it hands on the plain sum of the sites' vectors."""
    original = flwr_secaggplus.factor_extract
    expected = len(state.active_node_ids) * self.quantization_range

    def unweighted(parameters):
      claimed, rest = original(parameters)
      if claimed != expected:
        logging.error('SecAgg+ unmask: the sites claim a weight total of %d, not %d (one a '
                      'site): a site runs other code. The weights are ignored.', claimed,
                      expected)
      return self.quantization_range, rest

    flwr_secaggplus.factor_extract = unweighted
    try:
      return super().unmask_stage(driver, context, state)
    finally:
      flwr_secaggplus.factor_extract = original


def make_workflow(threshold: int, timeout: Optional[float],
                  train_timeout: Optional[float] = None) -> SecAggPlusWorkflow:
  """SecAgg+ with every sampled site a neighbour of every other (cross-silo: few sites)."""
  if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
    raise ValueError(f'threshold must be an integer of at least 2. Found {threshold!r}.')
  return _Workflow(
      num_shares=1.0, reconstruction_threshold=threshold,
      max_weight=1.0, clipping_range=mechanism.CLIPPING_RANGE,
      quantization_range=mechanism.QUANTIZATION_RANGE, modulus_range=mechanism.MODULUS_RANGE,
      timeout=timeout, train_timeout=train_timeout if train_timeout is not None else timeout)


def run_secure_round(driver, node_ids: Sequence[int], round_num: int,
                     weights: Sequence[np.ndarray], config: dict[str, Any],
                     threshold: int, timeout: Optional[float],
                     train_timeout: Optional[float] = None,
                     run_id: int = 0) -> Optional[SecureSum]:
  """Runs SecAgg+ over `node_ids`; returns the unmasked sum, or None if the round was abandoned.

  Args:
    driver: A flwr Driver (only create_message and send_and_receive are used).
    node_ids: The round's sites (all enrolled sites that are connected: rate 1).
    round_num: Used as the messages' group id.
    weights: The global model the sites start from.
    config: Round instructions for the sites (flat str/int/float values).
    threshold: SecAgg+ reconstruction threshold (sites that must stay to the end).
    timeout: Seconds each key-exchange stage waits for replies (None: forever).
    train_timeout: Seconds the training stage waits (default: `timeout`).
    run_id: The Flower run the messages belong to.
  """
  proxies = [DriverClientProxy(int(n), driver, False, run_id) for n in node_ids]
  fit_ins = FitIns(ndarrays_to_parameters([np.asarray(w, np.float32) for w in weights]),
                   dict(config))
  strategy = _CaptureStrategy(proxies, fit_ins)
  context = LegacyContext(
      context=Context(node_id=0, node_config={}, state=RecordSet(), run_config={}),
      config=ServerConfig(num_rounds=round_num), strategy=strategy,
      client_manager=SimpleClientManager())
  context.state.configs_records[MAIN_CONFIGS_RECORD] = ConfigsRecord(
      {WorkflowKey.CURRENT_ROUND: int(round_num)})
  context.state.parameters_records[MAIN_PARAMS_RECORD] = compat.parameters_to_parametersrecord(
      fit_ins.parameters, keep_input=True)
  make_workflow(threshold, timeout, train_timeout)(driver, context)
  return strategy.captured


REPORT_KEY = 'report'


def query_sites(driver, node_ids: Sequence[int], config: dict[str, Any],
                timeout: Optional[float], round_num: int = 0) -> dict[int, str]:
  """Asks each site for its report (a plain, unmasked get_properties message; what a site
  answers must be fit for the coordinator to read: privacy figures, never data). Returns
  {node id: report text} for the sites that answered in time without an error."""
  ins = compat.getpropertiesins_to_recordset(GetPropertiesIns(dict(config)))
  messages = [driver.create_message(content=ins, message_type=MessageTypeLegacy.GET_PROPERTIES,
                                    dst_node_id=int(n), group_id=str(round_num))
              for n in node_ids]
  replies = {}
  for message in driver.send_and_receive(messages, timeout=timeout):
    node = int(message.metadata.src_node_id)
    if message.has_error():
      logging.error('Site node %d could not report: %s', node, message.error.reason)
      continue
    res = compat.recordset_to_getpropertiesres(message.content)
    if res.status.code != Code.OK or not isinstance(res.properties.get(REPORT_KEY), str):
      logging.error('Site node %d sent no report (%s).', node, res.status.message)
      continue
    replies[node] = res.properties[REPORT_KEY]
  return replies


# Site side ---------------------------------------------------------------------------------

SiteFit = Callable[[list[np.ndarray], dict[str, Any]], np.ndarray]
SiteReport = Callable[[dict[str, Any]], str]


class _SiteClient(NumPyClient):

  def __init__(self, fit_fn: SiteFit, report_fn: Optional[SiteReport]):
    self._fit_fn = fit_fn
    self._report_fn = report_fn

  def fit(self, parameters, config):
    vector = self._fit_fn(list(parameters), dict(config))
    # num_examples 1: SecAgg+ weighs by it, and a real count would leak a site's data size.
    # No metrics: they travel unmasked.
    return [np.asarray(vector, np.float64)], 1, {}

  def get_properties(self, config):
    if self._report_fn is None:
      return {}
    return {REPORT_KEY: self._report_fn(dict(config))}


def make_site_app(fit_fn: SiteFit, report_fn: Optional[SiteReport] = None) -> ClientApp:
  """A ClientApp whose fit is `fit_fn`, masked by SecAgg+ (flwr's secaggplus_mod), and whose
  get_properties answers `report_fn` (unmasked: the example-level site's ledger figures)."""

  def client_fn(context: Context):
    del context
    return _SiteClient(fit_fn, report_fn).to_client()

  return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
