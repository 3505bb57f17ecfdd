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
import time
from collections.abc import Callable
from typing import Any, Optional

from absl import logging
import numpy as np

from tff_medical import categories
from tff_medical.aggregation import class_aware
from tff_medical.crosssilo import mechanism
from tff_medical.crosssilo import secagg
from tff_medical.crosssilo import site_worker
from tff_medical.crosssilo import transport
from tff_medical.errors import ConfigError
from tff_medical.errors import PolicyError
from tff_medical.monitoring import audit as audit_lib
from tff_medical.privacy import accounting
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling as sampling_lib
from tff_medical.training import config as config_lib
from tff_medical.training import evaluation
from tff_medical.training import program

SUPERLINK_LOG = 'superlink.log'
EVAL_DATASETS = ('none', 'phantoms', 'mednist', 'dicom')


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
  for field, supported in (('dp_mechanism', 'per_category_noise'), ('privacy_unit', 'client')):
    if config.get(field, supported) != supported:
      raise ConfigError(f'{field} must be {supported!r} for a cross-silo run (the only mechanism '
                        f'ported to secure aggregation). Found {config.get(field)!r}.')
  config_lib.validate(config)
  return config


def _set_population(config, deployment):
  config.num_clients = deployment.num_sites
  config.clients_per_round = deployment.num_sites
  config.sampling = 'poisson'
  config.dataset = 'phantoms' if deployment.eval_dataset == 'none' else deployment.eval_dataset
  config.data_dir = deployment.eval_data_dir
  config.num_per_category = deployment.eval_num_per_category


def _round_instructions(config, plan_json: str, params: dict, round_num: int) -> dict[str, Any]:
  return {
      site_worker.KEY_ROUND: int(round_num),
      site_worker.KEY_PLAN: plan_json,
      site_worker.KEY_PARAMS: json.dumps(params),
      site_worker.KEY_MODEL: json.dumps({'conv_filters': list(config.model.conv_filters),
                                         'dense_units': int(config.model.dense_units),
                                         'input_pooling': int(config.model.input_pooling),
                                         'head': str(config.model.head),
                                         'seed': int(config.seed)}),
      site_worker.KEY_CLIENT: json.dumps({'learning_rate': float(config.client.learning_rate),
                                          'batch_size': int(config.client.batch_size),
                                          'local_epochs': int(config.client.local_epochs)}),
      site_worker.KEY_SEED: int(config.seed),
  }


def _eval_data(config, deployment: Deployment):
  if deployment.eval_dataset == 'none':
    return None
  # pylint: disable=g-import-not-at-top
  from tff_medical.data import client_data as client_data_lib
  if deployment.eval_dataset == 'phantoms':
    from tff_medical.data import phantoms
    images = phantoms.generate(deployment.eval_num_per_category, seed=config.seed,
                               stream=phantoms.TEST_STREAM)
  else:
    images = program.load_images(config)
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
  config = _cross_silo_config(config, deployment)
  os.makedirs(run_dir, exist_ok=True)
  policy = policy_lib.load_policy(config.policy or policy_lib.DEFAULT_POLICY_PATH)
  spec = sampling_spec(deployment.num_sites)
  plan = program._calibrate(config, policy, spec)  # pylint: disable=protected-access
  clip = class_aware.AdaptiveClipSettings(config.clip.initial_l2_norm_clip,
                                          config.clip.target_unclipped_quantile,
                                          config.clip.learning_rate)
  mechanism_plan = mechanism.MechanismPlan(
      {c: accounting.AdaptiveClipSplit.from_json_dict(plan.splits[c])
       for c in categories.CATEGORY_IDS}, clip)
  plan_json = mechanism_plan.to_json()
  queries = mechanism.category_queries(mechanism_plan)
  states = mechanism.initial_states(queries)
  keras_model = program.build_keras_model(config)
  weights = [np.asarray(w, np.float32) for w in keras_model.get_weights()]
  if len(weights) != len(keras_model.trainable_weights):
    raise ConfigError('the model must have only trainable weights (no BatchNorm). Found '
                      f'{len(weights) - len(keras_model.trainable_weights)} others.')
  shapes = [w.shape for w in weights]
  optimizer = mechanism.ServerOptimizer(program._server_optimizer(config), weights)  # pylint: disable=protected-access
  ledger = ledger_lib.PrivacyLedger(policy, plan.noise_multipliers, spec, config.accountant)
  fingerprint = {
      'policy': policy.to_json_dict(), 'sampling': spec.to_json_dict(),
      'privacy': {'dp': True, 'accountant': config.accountant, 'clip': config.clip.to_dict()},
      'model': config.model.to_dict(), 'deployment': 'cross_silo',
  }
  fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True,
                                      default=program._json_default))  # pylint: disable=protected-access
  pseudonyms = _Pseudonyms()
  store = program._CheckpointStore(os.path.join(run_dir, program.CHECKPOINT_DIR),  # pylint: disable=protected-access
                                   config.checkpoints_to_keep)

  def program_state(round_num, round_record):
    return collections.OrderedDict(
        weights=[np.asarray(w, np.float32) for w in weights],
        optimizer=[np.asarray(v) for v in optimizer.flat_state()],
        queries=json.dumps({c: mechanism.flatten_state(states[c])
                            for c in categories.CATEGORY_IDS}),
        round=np.int64(round_num), ledger=json.dumps(ledger.state()),
        fingerprint=json.dumps(fingerprint, sort_keys=True),
        plan=json.dumps({'plan': dataclasses.asdict(plan), 'mechanism': plan_json}),
        pseudonyms=json.dumps(pseudonyms.mapping),
        round_record=json.dumps(round_record, default=program._json_default))  # pylint: disable=protected-access

  restored, round_num = store.load_latest(program_state(0, {}))
  last_record = {}
  if restored is not None:
    saved = json.loads(program._decode(restored['fingerprint']))  # pylint: disable=protected-access
    if saved != fingerprint:
      raise ConfigError(f'Cannot resume the run in {run_dir}: its policy, sites, privacy or '
                        'model settings differ from this configuration. Use the original '
                        'settings, or a new --experiment_name for a new run.')
    saved_plan = json.loads(program._decode(restored['plan']))  # pylint: disable=protected-access
    if saved_plan['mechanism'] != plan_json:
      # total_rounds changed: keep the calibration the run started with.
      plan = program._Plan(**saved_plan['plan'])  # pylint: disable=protected-access
      plan_json = saved_plan['mechanism']
      queries = mechanism.category_queries(mechanism.MechanismPlan.from_json(plan_json))
    weights = [np.asarray(w, np.float32) for w in restored['weights']]
    optimizer.load_flat_state(restored['optimizer'])
    flat_states = json.loads(program._decode(restored['queries']))  # pylint: disable=protected-access
    states = {c: mechanism.unflatten_state(queries[c], flat_states[c])
              for c in categories.CATEGORY_IDS}
    round_num = int(restored['round'])
    ledger = ledger_lib.PrivacyLedger.from_state(
        json.loads(program._decode(restored['ledger'])), policy, sampling=spec,  # pylint: disable=protected-access
        accountant=config.accountant)
    pseudonyms = _Pseudonyms(json.loads(program._decode(restored['pseudonyms'])))  # pylint: disable=protected-access
    last_record = json.loads(program._decode(restored['round_record']))  # pylint: disable=protected-access
    logging.info('Resuming %s after round %d.', run_dir, round_num)

  program._write_json_atomic(os.path.join(run_dir, program.CONFIG_FILE), {  # pylint: disable=protected-access
      'config': json.loads(config.to_json_best_effort()), 'plan': dataclasses.asdict(plan),
      'data_report': 'cross-silo: site data stays at the sites',
      'num_clients': deployment.num_sites, 'sampling': spec.to_json_dict(),
      'deployment': {'mode': 'cross_silo', 'num_sites': deployment.num_sites,
                     'secagg_threshold': deployment.threshold,
                     'fleet_address': deployment.fleet_address,
                     'eval_dataset': deployment.eval_dataset}})

  import asyncio  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  audit = audit_lib.AuditLog(os.path.join(run_dir, program.AUDIT_FILE))
  csv_release = tff.program.CSVFileReleaseManager(os.path.join(run_dir, program.METRICS_FILE),
                                                  key_fieldname='round')

  def release(record: dict) -> None:
    ledger.save(run_dir)
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
      released = ledger.releasable()
      if not released:
        stop_reason = 'budget_exhausted'
        break
      node_ids = _wait_for_sites(driver, deployment, superlink, first=first_round)
      first_round = False
      if node_ids is None:
        stop_reason = 'not_enough_sites'
        break
      started = time.monotonic()
      clip_norms = {c: mechanism.clip_norm(queries[c], states[c])
                    for c in categories.CATEGORY_IDS}
      params = mechanism.sample_params(queries, states)
      secure = secagg.run_secure_round(
          driver, node_ids, round_num + 1, weights,
          _round_instructions(config, plan_json, params, round_num + 1), deployment.threshold,
          deployment.stage_timeout, deployment.train_timeout, run_id=run_id)
      summed = None
      if secure is not None:
        try:
          summed = mechanism.decode_secure_sum(secure.vector, secure.contributors, clip_norms,
                                               shapes)
        except PolicyError as e:
          logging.error('Round %d: unusable secure sum (%s).', round_num + 1, e)
      if summed is None:
        abandoned_in_a_row += 1
        logging.warning('Round %d abandoned (%d of %d in a row): secure aggregation did not '
                        'complete; nothing released, no budget spent.', round_num + 1,
                        abandoned_in_a_row, deployment.max_abandoned_rounds)
        if abandoned_in_a_row >= deployment.max_abandoned_rounds:
          stop_reason = 'rounds_abandoned'
          break
        continue
      abandoned_in_a_row = 0
      result = mechanism.noised_round(queries, states, summed, released)
      before, saved_optimizer = weights, optimizer.state
      try:
        new_weights = optimizer.apply(weights, result.update)
        if not all(np.all(np.isfinite(w)) for w in new_weights):
          raise PolicyError('the server update must be finite. Found a non-finite weight.')
        ledger.record_round(result.events)  # Checks everything before it records anything.
      except PolicyError:
        optimizer.state = saved_optimizer
        raise
      round_num += 1
      states, weights = result.states, new_weights
      update_norm = float(np.sqrt(sum(np.sum((a.astype(np.float64) - b)**2)
                                      for a, b in zip(weights, before))))
      participants = pseudonyms(secure.node_ids)
      norms = {c: mechanism.clip_norm(queries[c], states[c]) for c in categories.CATEGORY_IDS}
      metrics = {'round': round_num, 'round_seconds': time.monotonic() - started,
                 'num_clients': secure.contributors, 'update_norm': update_norm,
                 'client_level_epsilon': ledger.client_level_epsilon,
                 'secure_sum_projected': int(sum(summed.projected.values()))}
      for c in categories.CATEGORY_IDS:
        metrics[f'epsilon/{c}'] = ledger.epsilon_spent(c)
        metrics[f'clip_norm/{c}'] = norms[c]
        metrics[f'released/{c}'] = int(c in released)
      audit_record = {
          'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'round': round_num,
          'participants': participants, 'num_participants': len(participants),
          'categories_released': list(released), 'update_norm': update_norm,
          'model_sha256': audit_lib.model_weights_sha256(weights), 'clip_norms': norms,
          'epsilon_spent': {c: ledger.epsilon_spent(c) for c in categories.CATEGORY_IDS},
          'client_level_epsilon': ledger.client_level_epsilon}
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
  if ledger.all_exhausted and stop_reason == 'completed':
    stop_reason = 'budget_exhausted'
  return program.RunResult(run_dir=run_dir, rounds_completed=round_num,
                           stop_reason=stop_reason, evaluation=final, ledger=ledger,
                           keras_model=keras_model, policy=policy)


def _wait_for_sites(driver, deployment: Deployment, superlink,
                    first: bool = False) -> Optional[list[int]]:
  """All N sites if they come in time, else whoever is there if at least the threshold.

  In time: within join_timeout before the first round of this process (sites start at their
  own pace), within stage_timeout before later ones (a site that dropped may come back).
  """
  deadline = time.monotonic() + deployment.join_timeout
  grace = time.monotonic() + (deployment.join_timeout if first else
                              min(deployment.stage_timeout, deployment.join_timeout))
  while True:
    if superlink is not None and not superlink.running():
      raise ConfigError(f'the SuperLink must keep running. It stopped; see '
                        f'{superlink.log_path}.')
    node_ids = sorted(int(n) for n in driver.get_node_ids())
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
