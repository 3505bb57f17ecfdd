"""The cross-silo coordinator: owns the SuperLink, runs SecAgg+ rounds, applies our DP math.

Its run directory is the simulation's, committed by the same run record (training/run_record.py);
why rate 1 and what an abandoned round spends: docs/DESIGN.md.
"""

import dataclasses
import json
import os
import secrets
import time
from collections.abc import Callable
from typing import Any, Optional

from absl import logging
import numpy as np

from tff_medical import categories
from tff_medical import fileio
from tff_medical.aggregation import class_aware
from tff_medical.crosssilo import mechanism
from tff_medical.crosssilo import secagg
from tff_medical.crosssilo import site_worker
from tff_medical.crosssilo import transport
from tff_medical.data import sources
from tff_medical.errors import ConfigError
from tff_medical.errors import PolicyError
from tff_medical.errors import TffMedicalError
from tff_medical.privacy import calibration
from tff_medical.privacy import example_ledger
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling as sampling_lib
from tff_medical.training import config as config_lib
from tff_medical.training import example_level
from tff_medical.training import privacy_unit
from tff_medical.training import program
from tff_medical.training import run_record

SUPERLINK_LOG = 'superlink.log'
EVAL_DATASETS = ('none',) + sources.NAMES


@dataclasses.dataclass(frozen=True)
class Deployment:
  """Where and with whom the coordinator runs.

  Attributes:
    pki_dir: The provisioning folder (experiments/provision.py); the coordinator reads
      pki_dir/coordinator only.
    num_sites: N, the enrolled sites: the population of the accounting (rate 1) and the
      denominator of the DP mean.
    threshold: SecAgg+ reconstruction threshold: the fewest sites that must stay to the end of a
      round for it to be released (at least 2).
    host: Fleet API address sites connect to (127.0.0.1: this machine only).
    fleet_port: Fleet API port.
    driver_port: Driver API port, always on 127.0.0.1 (only this process uses it).
    stage_timeout: Seconds a key-exchange stage waits for the sites.
    train_timeout: Seconds the training stage waits for the sites.
    join_timeout: Seconds to wait for all N sites before the first round (then it starts with
      at least `threshold`); later rounds wait `stage_timeout` for missing sites.
    max_abandoned_rounds: Consecutive abandoned rounds after which the coordinator stops.
    eval_dataset / eval_data_dir / eval_num_per_category: The coordinator's own evaluation set
      (never site data): 'none', 'phantoms', a MedNIST folder or a DICOM folder.
  """

  pki_dir: str
  num_sites: int
  threshold: int = 2
  host: str = '127.0.0.1'
  fleet_port: int = 9092
  driver_port: int = 9091
  stage_timeout: float = 60.0
  train_timeout: float = 600.0
  join_timeout: float = 600.0
  max_abandoned_rounds: int = 3
  eval_dataset: str = 'none'
  eval_data_dir: str = ''
  eval_num_per_category: int = 50

  def __post_init__(self):
    if isinstance(self.num_sites, bool) or not isinstance(self.num_sites, int) or \
        self.num_sites < 2:
      raise ConfigError(f'num_sites must be an integer of at least 2 (secure aggregation needs '
                        f'two). Found {self.num_sites!r}.')
    if self.num_sites * mechanism.QUANTIZATION_RANGE >= mechanism.MODULUS_RANGE:
      limit = mechanism.MODULUS_RANGE // mechanism.QUANTIZATION_RANGE
      raise ConfigError(f'num_sites must be below {limit} (SecAgg+ sums in 32-bit integers). '
                        f'Found {self.num_sites}.')
    if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or not (
        2 <= self.threshold <= self.num_sites):
      raise ConfigError(f'threshold must be an integer in [2, num_sites={self.num_sites}]. '
                        f'Found {self.threshold!r}.')
    for name in ('stage_timeout', 'train_timeout', 'join_timeout'):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f'{name} must be positive. Found {value!r}.')
    if self.eval_dataset not in EVAL_DATASETS:
      raise ConfigError(f'eval_dataset must be one of {", ".join(EVAL_DATASETS)}. '
                        f'Found {self.eval_dataset!r}.')

  @property
  def fleet_address(self) -> str:
    host = f'[{self.host}]' if ':' in self.host else self.host
    return f'{host}:{self.fleet_port}'

  @property
  def driver_address(self) -> str:
    return f'127.0.0.1:{self.driver_port}'


def sampling_spec(num_sites: int) -> sampling_lib.SamplingSpec:
  """Every enrolled site, every round: rate 1, no amplification."""
  return sampling_lib.SamplingSpec(sampling_lib.SamplingMethod.POISSON, num_sites, num_sites)


def _cross_silo_config(config, deployment: Deployment):
  """The simulation config with the population and sampling set to what really happens."""
  config = config.copy_and_resolve_references() if hasattr(
      config, 'copy_and_resolve_references') else config
  unlocked = config.unlocked() if hasattr(config, 'unlocked') else None
  if unlocked is not None:
    with unlocked:
      _set_population(config, deployment)
  else:
    _set_population(config, deployment)
  if not config.dp:
    raise ConfigError('dp must be True for a cross-silo run: the sites are promised that only '
                      'a noised aggregate is released. Found False.')
  config_lib.validate(config)
  if example_level.is_example(config):
    if config.example_dp.stack_client_level:
      raise ConfigError('example_dp.stack_client_level must be False for a cross-silo run: '
                        'client-level noise on top of example-level DP-SGD runs in the '
                        'simulation only (the secure sum here carries the sites\' DP-SGD deltas '
                        'and no client-level clip or noise). Found True.')
  elif config.get('dp_mechanism', 'per_category_noise') != 'per_category_noise':
    raise ConfigError(f'dp_mechanism must be \'per_category_noise\' for a client-level '
                      'cross-silo run (the only client-level mechanism ported to secure '
                      f'aggregation). Found {config.get("dp_mechanism")!r}.')
  return config


def _set_population(config, deployment):
  config.num_clients = deployment.num_sites
  config.clients_per_round = deployment.num_sites
  config.sampling = 'poisson'
  config.dataset = 'phantoms' if deployment.eval_dataset == 'none' else deployment.eval_dataset
  config.data_dir = deployment.eval_data_dir
  config.num_per_category = deployment.eval_num_per_category


def _model_instructions(config) -> str:
  return json.dumps({'conv_filters': list(config.model.conv_filters),
                     'dense_units': int(config.model.dense_units),
                     'input_pooling': int(config.model.input_pooling),
                     'head': str(config.model.head), 'seed': int(config.seed)})


def _round_instructions(config, plan_json: str, params: dict, round_num: int) -> dict[str, Any]:
  return {
      site_worker.KEY_ROUND: int(round_num),
      site_worker.KEY_PLAN: plan_json,
      site_worker.KEY_PARAMS: json.dumps(params),
      site_worker.KEY_MODEL: _model_instructions(config),
      site_worker.KEY_CLIENT: json.dumps({'learning_rate': float(config.client.learning_rate),
                                          'batch_size': int(config.client.batch_size),
                                          'local_epochs': int(config.client.local_epochs)}),
      site_worker.KEY_SEED: int(config.seed),
      site_worker.KEY_ROTATION: mechanism.new_rotation_seed(),
  }


def _eval_data(config, deployment: Deployment):
  if deployment.eval_dataset == 'none':
    return None
  # pylint: disable=g-import-not-at-top
  from tff_medical.data import client_data as client_data_lib
  # A generated source draws from its held-out stream, never the sites' training one.
  images = sources.load(deployment.eval_dataset, data_dir=deployment.eval_data_dir,
                        num_per_category=deployment.eval_num_per_category, seed=config.seed,
                        held_out=True)
  return client_data_lib.central_dataset(images, np.arange(len(images)))


class _Pseudonyms:
  """client_NNNNN per Flower node id, in order of first contribution (audit log ids)."""

  def __init__(self, mapping: Optional[dict[str, str]] = None):
    self.mapping = dict(mapping or {})

  def __call__(self, node_ids) -> list[str]:
    out = []
    for node_id in sorted(node_ids):
      key = str(int(node_id))
      if key not in self.mapping:
        self.mapping[key] = f'client_{len(self.mapping):05d}'
      out.append(self.mapping[key])
    return sorted(out)


@dataclasses.dataclass
class _Round:
  """A round's plan: its sites, their instructions, what they may release, the unit's notes."""

  node_ids: list[int]
  instructions: dict[str, Any]
  released: tuple[str, ...]
  notes: Any = None


@dataclasses.dataclass
class _Pending:
  """A round's aggregate before it is committed: the update and what commit records."""

  update: list[np.ndarray]
  released: tuple[str, ...]
  projected: int
  record: Any


class _ClientLevel(privacy_unit.ClientLevel):
  """privacy_unit 'client': class-aware DP-FedAvg, the coordinator's noise on the secure sum."""

  def __init__(self, config, policy, spec, shapes):
    super().__init__(config, policy, spec)
    self._shapes = shapes
    self.plan_restored()
    self.states = mechanism.initial_states(self.queries)

  def plan_restored(self) -> None:
    clip = class_aware.AdaptiveClipSettings(self._config.clip.initial_l2_norm_clip,
                                            self._config.clip.target_unclipped_quantile,
                                            self._config.clip.learning_rate)
    self.mechanism_json = mechanism.MechanismPlan(
        {c: calibration.AdaptiveClipSplit.from_json_dict(self.plan.splits[c])
         for c in categories.CATEGORY_IDS}, clip).to_json()
    self.queries = mechanism.category_queries(
        mechanism.MechanismPlan.from_json(self.mechanism_json))

  def checkpoint_fields(self) -> dict[str, Any]:
    return {'queries': json.dumps({c: mechanism.flatten_state(self.states[c])
                                   for c in categories.CATEGORY_IDS})}

  def restore(self, restored) -> None:
    super().restore(restored)
    flat_states = run_record.from_checkpoint(restored['queries'])
    self.states = {c: mechanism.unflatten_state(self.queries[c], flat_states[c])
                   for c in categories.CATEGORY_IDS}

  def clip_norms(self) -> dict[str, float]:
    return {c: mechanism.clip_norm(self.queries[c], self.states[c])
            for c in categories.CATEGORY_IDS}

  def exhausted(self) -> bool:
    return not self.ledger.releasable()

  def prepare(self, driver, node_ids, round_num, deployment, sites) -> Any:
    del driver, deployment, sites
    params = mechanism.sample_params(self.queries, self.states)
    return _Round(list(node_ids), _round_instructions(self._config, self.mechanism_json, params,
                                                      round_num),
                  self.ledger.releasable(), self.clip_norms())

  def aggregate(self, secure: secagg.SecureSum, prepared: _Round) -> _Pending:
    """Raises PolicyError for an unusable secure sum (the round is abandoned)."""
    summed = mechanism.decode_secure_sum(
        secure.vector, secure.contributors, prepared.notes, self._shapes,
        prepared.instructions[site_worker.KEY_ROTATION], int(self._config.num_clients))
    result = mechanism.noised_round(self.queries, self.states, summed, prepared.released)
    return _Pending(result.update, prepared.released, int(sum(summed.projected.values())),
                    result)

  def commit(self, pending: _Pending) -> None:
    self.ledger.record_round(pending.record.events)  # Checks everything before it records.
    self.states = pending.record.states


class _ExampleLevel(privacy_unit.ExampleLevel):
  """privacy_unit 'example': DP-SGD at each site; the coordinator averages, adding no noise.

  Each site plans, accounts and freezes on its own (site_worker.ExampleSite). Before a round the
  coordinator asks every site for its report (site_worker.ExampleReport) and takes part only the
  sites with a category left; after the secure sum it records the reported events of the sites
  in the sum into its example ledger (privacy/example_ledger.py, one entry per site, the whole
  the worst site), whose record_round checks them against the budgets once more. A site that
  reports fewer steps than the ledger holds for it (it lost its own ledger) or another sampling
  or plan than it started with is left out of the run.
  """

  def __init__(self, config, policy, shapes, run_dir: str):
    self._config, self._policy, self._shapes = config, policy, shapes
    self._bound = float(config.example_dp.update_l2_bound)
    self.ledger: Optional[example_level.LedgerView] = None
    self.run_id = _run_id(run_dir)

  def fingerprint_privacy(self) -> dict[str, Any]:
    return {'dp': True, 'accountant': self._config.accountant, 'privacy_unit': 'example',
            'example_dp': self._config.example_dp.to_dict(),
            'batch_size': int(self._config.client.batch_size)}

  def checkpoint_fields(self) -> dict[str, Any]:
    return {}

  def ledger_state(self) -> Any:
    return None if self.ledger is None else self.ledger.example.state()

  def plan_json(self) -> str:
    return json.dumps(self.plan_record(), sort_keys=True)

  def restore(self, restored) -> None:
    saved = run_record.from_checkpoint(restored['plan'])
    if saved.get('run_id') != self.run_id:
      raise ConfigError(f'Cannot resume the run in its folder: its run id '
                        f'({saved.get("run_id")!r}) differs from the folder\'s {RUN_ID_FILE} '
                        f'({self.run_id!r}). Restore that file, or start a new run.')
    state = run_record.from_checkpoint(restored['ledger'])
    if state is not None:
      self.ledger = example_level.LedgerView(example_ledger.ExampleLevelLedger.from_state(
          state, self._policy, accountant=self._config.accountant))

  def plan_record(self) -> dict[str, Any]:
    return {'privacy_unit': 'example', 'run_id': self.run_id,
            'update_l2_bound': self._bound,
            'site_plans': 'calibrated at each site from its own data; figures in the ledger'}

  def exhausted(self) -> bool:
    return (self.ledger is not None and
            len(self.ledger.example.sites) >= self._config.num_clients and
            self.ledger.all_exhausted)

  def _settings(self) -> str:
    return json.dumps(site_worker.example_settings(self._config, self._policy, self.run_id),
                      sort_keys=True)

  def _accept(self, report: site_worker.ExampleReport) -> Optional[str]:
    """Why the report's site must be left out, or None; adds a new site to the ledger."""
    if report.run != self.run_id:
      return f'it reports for run {report.run!r}, not {self.run_id!r}'
    steps = int(self._config.example_dp.local_steps)
    for c, event in report.events.items():
      if event is not None:
        q, _, event_steps = example_ledger.parse_step_event(event)
        if event_steps != steps or not np.isclose(q, report.spec.sampling.rate, rtol=1e-9):
          return (f'its {c} event ({event_steps} steps at rate {q}) is not {steps} steps at its '
                  f'rate {report.spec.sampling.rate}')
    if self.ledger is None:
      self.ledger = example_level.LedgerView(example_ledger.ExampleLevelLedger(
          self._policy, {report.site: report.spec}, steps, self._config.accountant))
      return None
    example = self.ledger.example
    if report.site not in example.sites:
      example.add_site(report.site, report.spec)
      return None
    if example.site_spec(report.site) != report.spec:
      return ('its example sampling or planned multipliers differ from those it started the run '
              'with (other data or settings)')
    lost = [c for c in categories.CATEGORY_IDS
            if report.steps_released[c] < example.site_steps_released(report.site, c)]
    if lost:
      return (f'its own ledger holds fewer steps than the run recorded for it ({", ".join(lost)}'
              '): it lost its ledger, and training on would restart its budget')
    frozen = [c for c in report.releasable if c not in example.releasable(report.site)]
    if frozen:
      return f'it would spend on {", ".join(frozen)}, exhausted at it by the run\'s ledger'
    return None

  def prepare(self, driver, node_ids, round_num, deployment, sites) -> Any:
    """The round's sites (those with budget left), 'budget_exhausted', or None (too few
    reports: the round is abandoned). `sites`: {node id: site} from the authenticated
    connection; a report naming another site is refused before the ledger sees it."""
    settings = self._settings()
    replies = secagg.query_sites(driver, node_ids, {
        site_worker.KEY_QUERY: site_worker.QUERY_EXAMPLE_REPORT,
        site_worker.KEY_EXAMPLE: settings, site_worker.KEY_ROUND: int(round_num)},
                                 deployment.stage_timeout, round_num)
    reports, seen = {}, set()
    for node, text in sorted(replies.items()):
      try:
        report = site_worker.ExampleReport.from_json(text)
        if report.site != sites.get(node):
          logging.error('Round %d: node %d left out: it reports as site %s, but its '
                        'certificate and node key are %s\'s.', round_num, node, report.site,
                        sites.get(node, 'no enrolled site'))
          continue
        why = 'another node already reports as this site' if report.site in seen else (
            self._accept(report))
      except TffMedicalError as e:
        logging.error('Round %d: node %d left out: unusable report (%s).', round_num, node, e)
        continue
      if why is not None:
        logging.error('Round %d: site %s left out of the run: %s.', round_num, report.site, why)
        continue
      seen.add(report.site)
      reports[node] = report
    participants = [n for n, r in reports.items() if r.releasable]
    if len(participants) >= deployment.threshold:
      released = tuple(c for c in categories.CATEGORY_IDS
                       if any(c in reports[n].releasable for n in participants))
      instructions = {site_worker.KEY_ROUND: int(round_num), site_worker.KEY_UNIT: 'example',
                      site_worker.KEY_EXAMPLE: settings,
                      site_worker.KEY_MODEL: _model_instructions(self._config),
                      site_worker.KEY_ROTATION: mechanism.new_rotation_seed()}
      return _Round(participants, instructions, released, reports)
    if len(reports) >= deployment.threshold:
      logging.warning('Round %d: %d of the %d reporting sites have budget left, fewer than the '
                      'threshold %d: stopping.', round_num, len(participants), len(reports),
                      deployment.threshold)
      return 'budget_exhausted'
    return None

  def aggregate(self, secure: secagg.SecureSum, prepared: _Round) -> _Pending:
    """The plain mean of the sites' deltas; raises PolicyError for an unusable secure sum."""
    mean, projected = mechanism.decode_update_sum(
        secure.vector, secure.contributors, self._bound, self._shapes,
        prepared.instructions[site_worker.KEY_ROTATION])
    reports = [prepared.notes[n] for n in secure.node_ids]
    released = tuple(c for c in categories.CATEGORY_IDS
                     if any(c in r.releasable for r in reports))
    return _Pending(mean, released, int(projected), {r.site: r.events for r in reports})

  def commit(self, pending: _Pending) -> None:
    self.ledger.example.record_round(pending.record)  # Checks everything before it records.


RUN_ID_FILE = 'run_id'


def _run_id(run_dir: str) -> str:
  """The run's id (random, made once, kept in run_dir): sites keep their ledger under it."""
  path = os.path.join(run_dir, RUN_ID_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return f.read().strip()
  run_id = secrets.token_hex(16)
  fileio.write_atomic(path, run_id + '\n')
  return run_id


def run(config, deployment: Deployment, run_dir: str, *,
        driver_factory: Optional[Callable[[], Any]] = None,
        on_round: Optional[Callable[[dict], None]] = None) -> program.RunResult:
  """Trains (or resumes) the cross-silo run in `run_dir` (docs/ARCHITECTURE.md, "A round's commit").

  Args:
    config: A training config (configs/*.py; base_config fields). Population and sampling are
      set from `deployment`; data fields are replaced by the coordinator's evaluation set.
    deployment: Sites, threshold, addresses and timeouts.
    run_dir: The run directory (created, or resumed).
    driver_factory: Tests only: a Flower Driver to use instead of starting a SuperLink.
    on_round: Called with each released round's record.
  """
  # The run directory holds participants and state: owner-only, as the simulation's.
  with fileio.owner_only():
    return _run(config, deployment, run_dir, driver_factory=driver_factory, on_round=on_round)


def _run(config, deployment: Deployment, run_dir: str, *, driver_factory, on_round
        ) -> run_record.RunResult:
  config = _cross_silo_config(config, deployment)
  os.makedirs(run_dir, exist_ok=True)
  policy = policy_lib.load_policy(config.policy or policy_lib.DEFAULT_POLICY_PATH)
  spec = sampling_spec(deployment.num_sites)
  keras_model = program.build_keras_model(config)
  weights = [np.asarray(w, np.float32) for w in keras_model.get_weights()]
  if len(weights) != len(keras_model.trainable_weights):
    raise ConfigError('the model must have only trainable weights (no BatchNorm). Found '
                      f'{len(weights) - len(keras_model.trainable_weights)} others.')
  shapes = [w.shape for w in weights]
  unit = (_ExampleLevel(config, policy, shapes, run_dir) if example_level.is_example(config)
          else _ClientLevel(config, policy, spec, shapes))
  optimizer = mechanism.ServerOptimizer(program.server_optimizer(config), weights)
  record = run_record.RunRecord(
      run_dir, {'policy': policy.to_json_dict(), 'sampling': spec.to_json_dict(),
                'privacy': unit.fingerprint_privacy(), 'model': config.model.to_dict(),
                'deployment': 'cross_silo'},
      checkpoints_to_keep=config.checkpoints_to_keep, on_round=on_round)
  pseudonyms = _Pseudonyms()

  def program_state(round_num: int, round_record: dict, audit_head=None):
    fields = dict(weights=[np.asarray(w, np.float32) for w in weights],
                  optimizer=[np.asarray(v) for v in optimizer.flat_state()],
                  pseudonyms=json.dumps(pseudonyms.mapping), **unit.checkpoint_fields())
    return record.program_state(fields, round_num, plan_json=unit.plan_json(),
                                ledger_state=unit.ledger_state(), round_record=round_record,
                                audit_head=audit_head)

  restored, round_num, last_record = record.restore(program_state(0, {}), unit)
  if restored is not None:
    weights = [np.asarray(w, np.float32) for w in restored['weights']]
    optimizer.load_flat_state(restored['optimizer'])
    pseudonyms = _Pseudonyms(run_record.from_checkpoint(restored['pseudonyms']))
  record.write_config({
      'config': json.loads(config.to_json_best_effort()), 'plan': unit.plan_record(),
      'data_report': 'cross-silo: site data stays at the sites',
      'num_clients': deployment.num_sites, 'sampling': spec.to_json_dict(),
      'deployment': {'mode': 'cross_silo', 'num_sites': deployment.num_sites,
                     'secagg_threshold': deployment.threshold,
                     'fleet_address': deployment.fleet_address,
                     'eval_dataset': deployment.eval_dataset, 'privacy_unit': unit.name}})
  record.start(unit.ledger, last_record)
  eval_data = _eval_data(config, deployment)
  stop_reason = run_record.COMPLETED
  with _Fleet(deployment, run_dir, driver_factory) as fleet:
    while round_num < config.total_rounds:
      if unit.exhausted():
        stop_reason = run_record.BUDGET_EXHAUSTED
        break
      outcome = fleet.secure_round(unit, weights, round_num + 1)
      if isinstance(outcome, str):
        stop_reason = outcome
        break
      if outcome is None:
        continue  # Abandoned: nothing released, the round number is reused.
      secure, pending, started = outcome
      before, weights = weights, _apply_update(optimizer, weights, pending, unit)
      round_num += 1
      round_record = _round_record(round_num, unit, secure, pending, started, before, weights,
                                   pseudonyms)
      if eval_data is not None and (round_num % config.eval_every == 0 or
                                    round_num == config.total_rounds):
        keras_model.set_weights(weights)
        run_record.evaluate_into(round_record['metrics'], keras_model, eval_data)
      record.commit(program_state(round_num, round_record, record.audit.head()), round_record,
                    unit.ledger)
  keras_model.set_weights(weights)
  return run_record.RunResult(
      run_dir=run_dir, rounds_completed=round_num,
      stop_reason=run_record.final_stop_reason(stop_reason, unit.ledger),
      evaluation=run_record.final_evaluation(keras_model, eval_data), ledger=unit.ledger,
      keras_model=keras_model, policy=policy)


def _round_record(round_num: int, unit, secure, pending: _Pending, started: float, before,
                  weights, pseudonyms: _Pseudonyms) -> dict[str, Any]:
  """A committed round's metrics and (confidential) audit record."""
  norm = run_record.update_norm(before, weights)
  unit_metrics, unit_audit = unit.round_outputs(pending.released)
  metrics = {'round': round_num, 'round_seconds': time.monotonic() - started,
             'num_clients': secure.contributors, 'update_norm': norm,
             'secure_sum_projected': pending.projected, **unit_metrics}
  audit_record = run_record.round_audit_record(
      round_num, pseudonyms(secure.node_ids), pending.released, norm, weights, **unit_audit)
  return {'round': round_num, 'audit': audit_record, 'metrics': metrics}


def _apply_update(optimizer, weights, pending: _Pending, unit) -> list[np.ndarray]:
  """The server step with a round's aggregate; the ledger records the round only if it holds."""
  saved_optimizer = optimizer.state
  try:
    new_weights = optimizer.apply(weights, pending.update)
    if not all(np.all(np.isfinite(w)) for w in new_weights):
      raise PolicyError('the server update must be finite. Found a non-finite weight.')
    unit.commit(pending)
  except PolicyError:
    optimizer.state = saved_optimizer
    raise
  return new_weights


class _Fleet:
  """The SuperLink and its driver for one coordinator process, and the rounds' secure sums."""

  def __init__(self, deployment: Deployment, run_dir: str, driver_factory):
    self._deployment, self._run_dir, self._driver_factory = deployment, run_dir, driver_factory
    self._superlink = None
    self._abandoned_in_a_row, self._first_round = 0, True

  def __enter__(self) -> '_Fleet':
    deployment = self._deployment
    if self._driver_factory is not None:
      self._driver, self._run_id = self._driver_factory(), 0
      return self
    self._superlink = transport.SuperLink(
        deployment.pki_dir, deployment.fleet_address, deployment.driver_address,
        os.path.join(self._run_dir, SUPERLINK_LOG),
        os.path.join(self._run_dir, 'superlink_storage'))
    try:
      self._superlink.start()
      self._driver = transport.make_driver(self._superlink.coordinator_dir,
                                           deployment.driver_address)
      self._run_id = transport.create_run(self._driver)
    except BaseException:
      self._superlink.stop()
      raise
    logging.warning('Coordinator listening for sites on %s.', deployment.fleet_address)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._superlink is not None:
      self._superlink.stop()

  def secure_round(self, unit, weights, round_num: int):
    """(secure sum, pending aggregate, start time); None for an abandoned round; or why the
    run stops ('not_enough_sites', 'budget_exhausted', 'rounds_abandoned')."""
    deployment = self._deployment
    node_ids = _wait_for_sites(self._driver, deployment, self._superlink, first=self._first_round)
    self._first_round = False
    if node_ids is None:
      return run_record.NOT_ENOUGH_SITES
    started = time.monotonic()
    sites = _node_sites(self._driver, self._superlink)
    prepared = unit.prepare(self._driver, node_ids, round_num, deployment,
                            {n: sites[n] for n in node_ids if n in sites})
    if isinstance(prepared, str):
      return prepared
    secure = None if prepared is None else secagg.run_secure_round(
        self._driver, prepared.node_ids, round_num, weights, prepared.instructions,
        deployment.threshold, deployment.stage_timeout, deployment.train_timeout,
        run_id=self._run_id)
    pending = None
    if secure is not None:
      try:
        pending = unit.aggregate(secure, prepared)
      except PolicyError as e:
        logging.error('Round %d: unusable secure sum (%s).', round_num, e)
    if pending is not None:
      self._abandoned_in_a_row = 0
      return secure, pending, started
    self._abandoned_in_a_row += 1
    logging.warning('Round %d abandoned (%d of %d in a row): secure aggregation did not '
                    'complete; nothing released, no budget spent.', round_num,
                    self._abandoned_in_a_row, deployment.max_abandoned_rounds)
    if self._abandoned_in_a_row >= deployment.max_abandoned_rounds:
      return run_record.ROUNDS_ABANDONED
    return None


def _node_sites(driver, superlink) -> dict[int, str]:
  """{node id: site} of the nodes that proved their enrolled key (tff_medical.crosssilo.identity):
  from the SuperLink, or from a test double's `node_identities`."""
  if superlink is not None:
    return superlink.identities()
  return {int(n): s for n, s in driver.node_identities().items()}


def _wait_for_sites(driver, deployment: Deployment, superlink,
                    first: bool = False) -> Optional[list[int]]:
  """All N sites if they come in time, else whoever is there if at least the threshold.

  In time: within join_timeout before the first round of this process (sites start at their
  own pace), within stage_timeout before later ones (a site that dropped may come back).
  Only nodes that proved their enrolled key count: Flower lists a node registered on a public
  key alone.
  """
  deadline = time.monotonic() + deployment.join_timeout
  grace = time.monotonic() + (deployment.join_timeout if first else
                              min(deployment.stage_timeout, deployment.join_timeout))
  while True:
    if superlink is not None and not superlink.running():
      raise ConfigError(f'the SuperLink must keep running. It stopped; see '
                        f'{superlink.log_path}.')
    sites = _node_sites(driver, superlink)
    node_ids = sorted(int(n) for n in driver.get_node_ids() if int(n) in sites)
    if len(node_ids) > deployment.num_sites:
      logging.warning('%d sites connected, %d enrolled for this run: using the first %d.',
                      len(node_ids), deployment.num_sites, deployment.num_sites)
      node_ids = node_ids[:deployment.num_sites]
    now = time.monotonic()
    if len(node_ids) == deployment.num_sites or (
        len(node_ids) >= deployment.threshold and now > grace):
      return node_ids
    if now > deadline:
      logging.error('Only %d of %d sites connected within %g s (need %d).', len(node_ids),
                    deployment.num_sites, deployment.join_timeout, deployment.threshold)
      return None
    time.sleep(0.5)
