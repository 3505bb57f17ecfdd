"""The cross-silo coordinator: owns the SuperLink, runs SecAgg+ rounds, applies our DP math.

The run directory is the simulation's (tff_medical.training.program): config.json, the privacy
ledger, metrics.csv, the audit log, checkpoints, and at the end the dashboard, SavedModel and
model card, written by the same functions. Each round is committed as the simulation commits
it: the ledger records the round's DP events, the whole state is checkpointed, and only then is
anything released. A restarted coordinator resumes after its last checkpointed round (sites
reconnect by themselves, see tff_medical.crosssilo.site_runtime).

Accounting follows what happens: the enrolled sites are the whole population and every
connected site takes part in every round, so there is no sampling amplification. That is
Poisson sampling with rate 1 (SamplingSpec('poisson', N, N)), which dp_accounting treats as the
plain Gaussian mechanism under add-or-remove-one, the relation of the per-category promise. A
round in which fewer sites take part releases a sum over fewer sites with the same noise: the
bound per site is unchanged.

A round is abandoned when SecAgg+ cannot finish (fewer sites than its threshold at some stage):
nothing was unmasked, so the model, the clip norms and the ledger stay as they were and the
round number is reused.
"""

import collections
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
from tff_medical.monitoring import audit as audit_lib
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration
from tff_medical.privacy import example_ledger
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling as sampling_lib
from tff_medical.training import config as config_lib
from tff_medical.training import evaluation
from tff_medical.training import example_level
from tff_medical.training import program

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


class _ClientLevel:
  """privacy_unit 'client': class-aware DP-FedAvg, the coordinator's noise on the secure sum."""

  privacy_unit = 'client'

  def __init__(self, config, policy, spec, shapes):
    self._config, self._policy, self._spec, self._shapes = config, policy, spec, shapes
    self.plan = program._calibrate(config, policy, spec)  # pylint: disable=protected-access
    self._clip = class_aware.AdaptiveClipSettings(config.clip.initial_l2_norm_clip,
                                                  config.clip.target_unclipped_quantile,
                                                  config.clip.learning_rate)
    self.plan_json = mechanism.MechanismPlan(
        {c: calibration.AdaptiveClipSplit.from_json_dict(self.plan.splits[c])
         for c in categories.CATEGORY_IDS}, self._clip).to_json()
    self.queries = mechanism.category_queries(mechanism.MechanismPlan.from_json(self.plan_json))
    self.states = mechanism.initial_states(self.queries)
    whole_client = {
        c: calibration.AdaptiveClipSplit.from_json_dict(split).whole_client_noise_multiplier
        for c, split in self.plan.splits.items()}
    self.ledger = ledger_lib.PrivacyLedger(policy, self.plan.noise_multipliers, spec,
                                           config.accountant,
                                           whole_client_noise_multipliers=whole_client)

  def fingerprint_privacy(self) -> dict[str, Any]:
    return {'dp': True, 'accountant': self._config.accountant,
            'clip': self._config.clip.to_dict()}

  def checkpoint(self) -> dict[str, Any]:
    return {'queries': json.dumps({c: mechanism.flatten_state(self.states[c])
                                   for c in categories.CATEGORY_IDS}),
            'ledger': json.dumps(self.ledger.state()),
            'plan': json.dumps({'plan': dataclasses.asdict(self.plan),
                                'mechanism': self.plan_json})}

  def restore(self, restored) -> None:
    saved_plan = json.loads(program._decode(restored['plan']))  # pylint: disable=protected-access
    if saved_plan['mechanism'] != self.plan_json:
      # total_rounds changed: keep the calibration the run started with.
      self.plan = program._Plan(**saved_plan['plan'])  # pylint: disable=protected-access
      self.plan_json = saved_plan['mechanism']
      self.queries = mechanism.category_queries(mechanism.MechanismPlan.from_json(self.plan_json))
    flat_states = json.loads(program._decode(restored['queries']))  # pylint: disable=protected-access
    self.states = {c: mechanism.unflatten_state(self.queries[c], flat_states[c])
                   for c in categories.CATEGORY_IDS}
    self.ledger = ledger_lib.PrivacyLedger.from_state(
        json.loads(program._decode(restored['ledger'])), policy=self._policy,  # pylint: disable=protected-access
        sampling=self._spec, accountant=self._config.accountant)

  def plan_record(self) -> dict[str, Any]:
    return dataclasses.asdict(self.plan)

  def exhausted(self) -> bool:
    return not self.ledger.releasable()

  def prepare(self, driver, node_ids, round_num, deployment, sites) -> Any:
    del driver, deployment, sites
    params = mechanism.sample_params(self.queries, self.states)
    clip_norms = {c: mechanism.clip_norm(self.queries[c], self.states[c])
                  for c in categories.CATEGORY_IDS}
    return _Round(list(node_ids), _round_instructions(self._config, self.plan_json, params,
                                                      round_num),
                  self.ledger.releasable(), clip_norms)

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

  def round_outputs(self, pending: _Pending) -> tuple[dict[str, Any], dict[str, Any],
                                                     dict[str, Any]]:
    """(headline metrics, per-category metrics, audit fields) of a committed round."""
    norms = {c: mechanism.clip_norm(self.queries[c], self.states[c])
             for c in categories.CATEGORY_IDS}
    head = {'client_level_epsilon': self.ledger.client_level_epsilon}
    metrics = {}
    for c in categories.CATEGORY_IDS:
      metrics[f'epsilon/{c}'] = self.ledger.epsilon_spent(c)
      metrics[f'clip_norm/{c}'] = norms[c]
      metrics[f'released/{c}'] = int(c in pending.released)
    audit = {'clip_norms': norms,
             'epsilon_spent': {c: self.ledger.epsilon_spent(c) for c in categories.CATEGORY_IDS},
             'client_level_epsilon': self.ledger.client_level_epsilon}
    return head, metrics, audit


class _ExampleLevel:
  """privacy_unit 'example': DP-SGD at each site; the coordinator averages, adding no noise.

  Each site plans, accounts and freezes on its own (site_worker.ExampleSite). Before a round the
  coordinator asks every site for its report (site_worker.ExampleReport) and takes part only the
  sites with a category left; after the secure sum it records the reported events of the sites
  in the sum into its example ledger (privacy/example_ledger.py, one entry per site, the whole
  the worst site), whose record_round checks them against the budgets once more. A site that
  reports fewer steps than the ledger holds for it (it lost its own ledger) or another sampling
  or plan than it started with is left out of the run.
  """

  privacy_unit = 'example'

  def __init__(self, config, policy, shapes, run_dir: str):
    self._config, self._policy, self._shapes = config, policy, shapes
    self._bound = float(config.example_dp.update_l2_bound)
    self.ledger: Optional[example_level.LedgerView] = None
    self.run_id = _run_id(run_dir)

  def fingerprint_privacy(self) -> dict[str, Any]:
    return {'dp': True, 'accountant': self._config.accountant, 'privacy_unit': 'example',
            'example_dp': self._config.example_dp.to_dict(),
            'batch_size': int(self._config.client.batch_size)}

  def checkpoint(self) -> dict[str, Any]:
    return {'ledger': json.dumps(None if self.ledger is None else self.ledger.example.state()),
            'plan': json.dumps(self.plan_record(), sort_keys=True)}

  def restore(self, restored) -> None:
    saved = json.loads(program._decode(restored['plan']))  # pylint: disable=protected-access
    if saved.get('run_id') != self.run_id:
      raise ConfigError(f'Cannot resume the run in its folder: its run id '
                        f'({saved.get("run_id")!r}) differs from the folder\'s {RUN_ID_FILE} '
                        f'({self.run_id!r}). Restore that file, or start a new run.')
    state = json.loads(program._decode(restored['ledger']))  # pylint: disable=protected-access
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

  def round_outputs(self, pending: _Pending) -> tuple[dict[str, Any], dict[str, Any],
                                                     dict[str, Any]]:
    """(headline metrics, per-category metrics, audit fields) of a committed round."""
    spent = {c: self.ledger.epsilon_spent(c) for c in categories.CATEGORY_IDS}
    metrics = {}
    for c in categories.CATEGORY_IDS:
      metrics[f'epsilon/{c}'] = spent[c]
      metrics[f'released/{c}'] = int(c in pending.released)
    return ({'example_level_epsilon': self.ledger.example.example_level_epsilon}, metrics,
            {'epsilon_spent': spent})


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
  """Trains (or resumes) the cross-silo run in `run_dir`; see the module docstring.

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
        ) -> program.RunResult:
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
  fingerprint = {
      'policy': policy.to_json_dict(), 'sampling': spec.to_json_dict(),
      'privacy': unit.fingerprint_privacy(),
      'model': config.model.to_dict(), 'deployment': 'cross_silo',
  }
  fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True,
                                      default=program._json_default))  # pylint: disable=protected-access
  pseudonyms = _Pseudonyms()
  store = program._CheckpointStore(os.path.join(run_dir, program.CHECKPOINT_DIR),  # pylint: disable=protected-access
                                   config.checkpoints_to_keep)

  def program_state(round_num, round_record):
    fields = unit.checkpoint()
    state = collections.OrderedDict(
        weights=[np.asarray(w, np.float32) for w in weights],
        optimizer=[np.asarray(v) for v in optimizer.flat_state()])
    if 'queries' in fields:
      state['queries'] = fields['queries']
    state.update(round=np.int64(round_num), ledger=fields['ledger'],
                 fingerprint=json.dumps(fingerprint, sort_keys=True), plan=fields['plan'],
                 pseudonyms=json.dumps(pseudonyms.mapping),
                 round_record=json.dumps(round_record, default=program._json_default))  # pylint: disable=protected-access
    return state

  restored, round_num = store.load_latest(program_state(0, {}))
  last_record = {}
  if restored is not None:
    saved = json.loads(program._decode(restored['fingerprint']))  # pylint: disable=protected-access
    if saved != fingerprint:
      raise ConfigError(f'Cannot resume the run in {run_dir}: its policy, sites, privacy or '
                        'model settings differ from this configuration. Use the original '
                        'settings, or a new --experiment_name for a new run.')
    unit.restore(restored)
    weights = [np.asarray(w, np.float32) for w in restored['weights']]
    optimizer.load_flat_state(restored['optimizer'])
    round_num = int(restored['round'])
    pseudonyms = _Pseudonyms(json.loads(program._decode(restored['pseudonyms'])))  # pylint: disable=protected-access
    last_record = json.loads(program._decode(restored['round_record']))  # pylint: disable=protected-access
    logging.info('Resuming %s after round %d.', run_dir, round_num)

  program._write_json_atomic(os.path.join(run_dir, program.CONFIG_FILE), {  # pylint: disable=protected-access
      'config': json.loads(config.to_json_best_effort()), 'plan': unit.plan_record(),
      'data_report': 'cross-silo: site data stays at the sites',
      'num_clients': deployment.num_sites, 'sampling': spec.to_json_dict(),
      'deployment': {'mode': 'cross_silo', 'num_sites': deployment.num_sites,
                     'secagg_threshold': deployment.threshold,
                     'fleet_address': deployment.fleet_address,
                     'eval_dataset': deployment.eval_dataset,
                     'privacy_unit': unit.privacy_unit}})

  import asyncio  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  audit = audit_lib.AuditLog(os.path.join(run_dir, program.AUDIT_FILE))
  csv_release = tff.program.CSVFileReleaseManager(os.path.join(run_dir, program.METRICS_FILE),
                                                  key_fieldname='round')

  def release(record: dict) -> None:
    if unit.ledger is not None:
      unit.ledger.save(run_dir)
    if record.get('audit') and (audit.last_round() or 0) < record['round']:
      audit.append(record['audit'])
    asyncio.run(csv_release.release(record['metrics'], key=record['round']))
    if on_round is not None:
      on_round(record)

  audit.repair_partial_tail()
  if last_record:
    release(last_record)

  eval_data = _eval_data(config, deployment)
  superlink = None
  stop_reason = 'completed'
  try:
    if driver_factory is not None:
      driver, run_id = driver_factory(), 0
    else:
      superlink = transport.SuperLink(
          deployment.pki_dir, deployment.fleet_address, deployment.driver_address,
          os.path.join(run_dir, SUPERLINK_LOG), os.path.join(run_dir, 'superlink_storage'))
      superlink.start()
      driver = transport.make_driver(superlink.coordinator_dir, deployment.driver_address)
      run_id = transport.create_run(driver)
      logging.warning('Coordinator listening for sites on %s.', deployment.fleet_address)
    abandoned_in_a_row, first_round = 0, True
    while round_num < config.total_rounds:
      if unit.exhausted():
        stop_reason = 'budget_exhausted'
        break
      node_ids = _wait_for_sites(driver, deployment, superlink, first=first_round)
      first_round = False
      if node_ids is None:
        stop_reason = 'not_enough_sites'
        break
      started = time.monotonic()
      sites = _node_sites(driver, superlink)
      prepared = unit.prepare(driver, node_ids, round_num + 1, deployment,
                              {n: sites[n] for n in node_ids if n in sites})
      if isinstance(prepared, str):
        stop_reason = prepared
        break
      secure = None if prepared is None else secagg.run_secure_round(
          driver, prepared.node_ids, round_num + 1, weights, prepared.instructions,
          deployment.threshold, deployment.stage_timeout, deployment.train_timeout,
          run_id=run_id)
      pending = None
      if secure is not None:
        try:
          pending = unit.aggregate(secure, prepared)
        except PolicyError as e:
          logging.error('Round %d: unusable secure sum (%s).', round_num + 1, e)
      if pending is None:
        abandoned_in_a_row += 1
        logging.warning('Round %d abandoned (%d of %d in a row): secure aggregation did not '
                        'complete; nothing released, no budget spent.', round_num + 1,
                        abandoned_in_a_row, deployment.max_abandoned_rounds)
        if abandoned_in_a_row >= deployment.max_abandoned_rounds:
          stop_reason = 'rounds_abandoned'
          break
        continue
      abandoned_in_a_row = 0
      before, saved_optimizer = weights, optimizer.state
      try:
        new_weights = optimizer.apply(weights, pending.update)
        if not all(np.all(np.isfinite(w)) for w in new_weights):
          raise PolicyError('the server update must be finite. Found a non-finite weight.')
        unit.commit(pending)
      except PolicyError:
        optimizer.state = saved_optimizer
        raise
      round_num += 1
      weights = new_weights
      update_norm = float(np.sqrt(sum(np.sum((a.astype(np.float64) - b)**2)
                                      for a, b in zip(weights, before))))
      participants = pseudonyms(secure.node_ids)
      head, unit_metrics, unit_audit = unit.round_outputs(pending)
      metrics = {'round': round_num, 'round_seconds': time.monotonic() - started,
                 'num_clients': secure.contributors, 'update_norm': update_norm, **head,
                 'secure_sum_projected': pending.projected, **unit_metrics}
      audit_record = {
          'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'round': round_num,
          'participants': participants, 'num_participants': len(participants),
          'categories_released': list(pending.released), 'update_norm': update_norm,
          'model_sha256': audit_lib.model_weights_sha256(weights), **unit_audit}
      if eval_data is not None and (round_num % config.eval_every == 0 or
                                    round_num == config.total_rounds):
        keras_model.set_weights(weights)
        evaluated = evaluation.evaluate(keras_model, eval_data)
        metrics.update({f'eval/{k}': v for k, v in evaluated.items()
                        if k != 'confusion_matrix'})
        metrics['eval/confusion_matrix'] = json.dumps(evaluated['confusion_matrix'])
      record = {'round': round_num, 'audit': audit_record, 'metrics': metrics}
      store.save(program_state(round_num, record), round_num)
      release(record)
  finally:
    if superlink is not None:
      superlink.stop()

  keras_model.set_weights(weights)
  if eval_data is not None:
    final = evaluation.evaluate(keras_model, eval_data)
  else:
    final = {f'accuracy/{c}': float('nan') for c in categories.CATEGORY_IDS}
    final['accuracy'] = float('nan')
  if unit.ledger is not None and unit.ledger.all_exhausted and stop_reason == 'completed':
    stop_reason = 'budget_exhausted'
  return program.RunResult(run_dir=run_dir, rounds_completed=round_num,
                           stop_reason=stop_reason, evaluation=final, ledger=unit.ledger,
                           keras_model=keras_model, policy=policy)


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
