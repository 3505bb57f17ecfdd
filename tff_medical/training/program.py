"""The training program: data, partition, calibrated class-aware process, and the round loop.

Every round is committed once, in this order, so that an interruption at any moment (kill -9
included) loses no round and counts none twice:
  1. the round runs and the ledger records the DP events read from the aggregator state;
  2. the whole program state (model, optimizer, aggregator, sampler and its secret, ledger, the
     audit chain's head, the round's audit record and metrics) is saved as one checkpoint;
  3. the spend is recorded durably: the dataset's budget registry, then the keyed audit log;
  4. only then is anything published: privacy_ledger.json, metrics.
A resumed run loads the newest readable checkpoint and re-releases that round's outputs where
they are missing. A run whose audit log or registry shows rounds beyond its newest readable
checkpoint (a checkpoint lost or corrupted) is refused: retraining them would release models
whose spend the ledger could not count. Everything in a run directory is created owner-only.
"""

import asyncio
import collections
import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_medical import categories
from tff_medical import fileio
from tff_medical import run_files
from tff_medical.aggregation import class_aware
from tff_medical.data import client_data as client_data_lib
from tff_medical.data import model_input
from tff_medical.data import partition as partition_lib
from tff_medical.data import phantoms
from tff_medical.data import source as source_lib
from tff_medical.data import sources
from tff_medical.errors import ConfigError
from tff_medical.errors import PolicyError
from tff_medical.models import cnn
from tff_medical.monitoring import audit as audit_lib
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration
from tff_medical.privacy import budget_registry
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling as sampling_lib
from tff_medical.privacy import shared_noise_calibration as shared_noise
from tff_medical.training import config as config_lib
from tff_medical.training import dp_sgd
from tff_medical.training import evaluation
from tff_medical.training import example_level
from tff_medical.training import local_training
from tff_medical.training import process as process_lib

CHECKPOINT_DIR = run_files.CHECKPOINT_DIR
CONFIG_FILE = run_files.CONFIG_FILE
METRICS_FILE = run_files.METRICS_FILE
AUDIT_FILE = run_files.AUDIT_FILE
TENSORBOARD_DIR = run_files.TENSORBOARD_DIR
MANIFEST_FILE = run_files.MANIFEST_FILE
# The settings a resumed run must share with the run it continues.
_FINGERPRINT_SECTIONS = ('policy', 'sampling', 'dataset', 'partition', 'privacy', 'model')


@dataclasses.dataclass
class RunResult:
  run_dir: str
  rounds_completed: int
  stop_reason: str
  evaluation: dict
  ledger: Optional[ledger_lib.PrivacyLedger]
  keras_model: tf.keras.Model
  policy: policy_lib.PrivacyPolicy
  saved_model_dir: Optional[str] = None


def load_images(config) -> source_lib.LabeledImages:
  """The configured image source, loaded whole (images are 4 KiB each)."""
  return sources.load(config.dataset, data_dir=config.get('data_dir', ''),
                      num_per_category=config.get('num_per_category'),
                      seed=config.get('seed', 0), difficulty=config.get('phantom_difficulty'),
                      pacs=config.get('pacs'))


def build_keras_model(config) -> tf.keras.Model:
  return cnn.build_cnn(tuple(config.model.conv_filters), config.model.dense_units,
                       seed=config.seed, input_pooling=config.model.get('input_pooling', 1),
                       head=config.model.get('head', 'gap'))


def server_optimizer(config):
  """The configured TFF server optimizer (adam or SGD with momentum)."""
  if config.server.optimizer == 'adam':
    return tff.learning.optimizers.build_adam(config.server.learning_rate)
  return tff.learning.optimizers.build_sgdm(config.server.learning_rate,
                                            momentum=config.server.momentum or None)


@dataclasses.dataclass
class _Plan:
  """What calibration decided; saved with the run and reused on resume."""

  noise_multipliers: Optional[dict[str, float]]
  splits: Optional[dict[str, dict[str, float]]]
  # privacy_unit 'example' only (example_level.calibrate); absent from client-level plans.
  example: Optional[dict[str, Any]] = None

  def to_json(self) -> str:
    value = dataclasses.asdict(self)
    if value['example'] is None:
      del value['example']  # Client-level plans stay as saved before the option.
    return json.dumps(value, sort_keys=True)


def _calibrate(config, policy, sampling_spec,
               earlier: Optional[ledger_lib.EarlierRuns] = None) -> _Plan:
  if not config.dp:
    return _Plan(None, None)
  spent_before = None
  if earlier is not None and earlier.runs:
    spent_before = {c: {r: earlier.events(c, r) for r in accounting.Relation}
                    for c in categories.CATEGORY_IDS}
  # Shared noise: one clipped count, so one count stddev for every category's split.
  splits_fn = (shared_noise.shared_noise_splits if _dp_mechanism(config) == 'shared_noise' else
               calibration.category_splits)
  try:
    noise = calibration.calibrate_category_noise(policy, sampling_spec, config.total_rounds,
                                                config.accountant, spent_before)
    splits = splits_fn(
        noise, sampling_spec.expected_clients_per_round,
        max_value_noise_inflation=config.clip.max_value_noise_inflation,
        max_count_noise_fraction=config.clip.max_count_noise_fraction)
  except PolicyError as e:
    if not spent_before:
      raise
    raise ConfigError(f'{e} Earlier runs on the same data ({len(earlier.runs)}) leave too little '
                      f'of the policy for {config.total_rounds} more rounds: '
                      f'{_earlier_spend_summary(policy, sampling_spec, config, earlier)}.') from None
  return _Plan(noise, {c: s.to_json_dict() for c, s in splits.items()})


def _earlier_spend_summary(policy, sampling_spec, config, earlier) -> str:
  ledger = ledger_lib.PrivacyLedger(policy, {c: 1.0 for c in categories.CATEGORY_IDS},
                                    sampling_spec, config.accountant, earlier=earlier)
  return ', '.join(f'{c} {ledger.epsilon_spent(c):.4g} of {policy.budget(c).epsilon:g}'
                   for c in categories.CATEGORY_IDS)


def _dp_mechanism(config) -> str:
  # A config.json written before dp_mechanism existed has none: per-category noise.
  return config.get('dp_mechanism', 'per_category_noise')


def _fingerprint(config, policy, sampling_spec, partition) -> dict[str, Any]:
  fingerprint = {
      'policy': policy.to_json_dict(),
      'sampling': sampling_spec.to_json_dict(),
      'dataset': {'dataset': config.dataset, 'data_dir': config.data_dir,
                  'num_per_category': config.num_per_category
                                      if sources.get(config.dataset).generated else None},
      'partition': partition.fingerprint(),
      'privacy': {'dp': config.dp, 'accountant': config.accountant,
                  'clip': config.clip.to_dict()},
      'model': config.model.to_dict(),
  }
  difficulty = config.get('phantom_difficulty', phantoms.DEFAULT_DIFFICULTY)
  if config.dataset == 'phantoms' and difficulty != phantoms.DEFAULT_DIFFICULTY:
    # Only when set: run directories from before the field existed still resume.
    fingerprint['dataset']['phantom_difficulty'] = difficulty
  if _dp_mechanism(config) != 'per_category_noise':
    # Only when not the default, so that runs saved before the option still resume.
    fingerprint['privacy']['dp_mechanism'] = _dp_mechanism(config)
  return fingerprint


def _json_default(value):
  if isinstance(value, (tuple, np.ndarray)):
    return list(value)
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f'not JSON serializable: {type(value).__name__}')


def _write_json_atomic(path: str, value: Any) -> None:
  fileio.write_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=_json_default))


def _weights_list(model_weights) -> list[np.ndarray]:
  return [np.asarray(w) for w in list(model_weights.trainable) + list(model_weights.non_trainable)]


def _update_norm(before, after) -> float:
  return float(np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64))**2)
                           for a, b in zip(before.trainable, after.trainable))))


class _CheckpointStore:
  """FileProgramStateManager, tolerant of a version left half-written by a killed process."""

  def __init__(self, root: str, keep_total: int):
    self._root = root
    self._manager = tff.program.FileProgramStateManager(root, prefix='round_',
                                                        keep_total=keep_total)
    # A process killed while saving leaves round_N_tempNNNN behind (TFF renames it into place
    # only when complete): never a version, only disk.
    if os.path.isdir(root):
      import shutil  # pylint: disable=g-import-not-at-top
      for name in os.listdir(root):
        if name.startswith('round_') and '_temp' in name:
          shutil.rmtree(os.path.join(root, name), ignore_errors=True)

  def load_latest(self, structure) -> tuple[Optional[Any], int]:
    versions = asyncio.run(self._manager.get_versions()) or []
    for version in sorted(versions, reverse=True):
      try:
        return asyncio.run(self._manager.load(version, structure)), version
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint version %d unreadable (%s); trying an older one.', version, e)
    if versions:
      # Starting over would overwrite a run's state and ledger: refuse instead. A training state
      # of another shape (model, aggregator or privacy settings) is the usual cause.
      raise ConfigError(
          f'Cannot resume the run in {os.path.dirname(self._root)}: none of its checkpoints '
          f'(rounds {", ".join(map(str, sorted(versions)))}) matches the training state of this '
          'configuration (a different model, aggregator or privacy setting?). Use the original '
          'settings, or a new --experiment_name for a new run.')
    return None, 0

  def save(self, program_state, version: int) -> None:
    asyncio.run(self._manager.save(program_state, version))


def _decode(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def run(config, run_dir: str, *, progress: bool = False,
        on_round: Optional[Callable[[dict], None]] = None,
        stop_after_rounds: Optional[int] = None) -> RunResult:
  """Trains (or resumes) the configured run in `run_dir`; see the module docstring.

  `stop_after_rounds` ends this invocation after that many new rounds (for tests of resume).
  """
  with fileio.owner_only():
    return _run(config, run_dir, progress=progress, on_round=on_round,
                stop_after_rounds=stop_after_rounds)


def _run_id(run_dir: str) -> str:
  """The run's id in the budget registry: kept in config.json, new for a new run directory."""
  try:
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
      run_id = json.load(f).get('run_id')
  except (OSError, ValueError, AttributeError):
    run_id = None
  import secrets  # pylint: disable=g-import-not-at-top
  return run_id if isinstance(run_id, str) and run_id else secrets.token_hex(16)


def _registry(config, images) -> Optional[budget_registry.BudgetRegistry]:
  """The budget registry of real data; None for generated images (nobody to protect)."""
  if sources.get(config.dataset).generated:
    return None
  return budget_registry.BudgetRegistry(
      config.get('budget_registry_dir') or budget_registry.default_registry_dir(),
      budget_registry.dataset_fingerprint(images.images, images.labels))


def _run(config, run_dir: str, *, progress: bool, on_round, stop_after_rounds) -> RunResult:
  config_lib.validate(config)
  os.makedirs(run_dir, exist_ok=True)
  policy = policy_lib.load_policy(config.policy or policy_lib.DEFAULT_POLICY_PATH)
  images = load_images(config)
  logging.info('%s', images.report.summary())
  partition = partition_lib.partition(
      images.labels, config.num_clients, config.partition, alpha=config.dirichlet_alpha,
      seed=config.seed, test_fraction=config.test_fraction,
      holdout_fraction=config.holdout_fraction, size_skew=config.size_skew)
  sampling_spec = sampling_lib.SamplingSpec(config.sampling, partition.num_clients,
                                            config.clients_per_round)
  fingerprint = _fingerprint(config, policy, sampling_spec, partition)
  example = example_level.is_example(config)
  run_id = _run_id(run_dir)
  registry = None if example else _registry(config, images)
  earlier = None
  registered = None
  if registry is not None:
    registered = registry.entry(run_id)
    if not config.dp and not config.get('release_non_private', False):
      raise ConfigError(
          f'release_non_private must be true to train without DP on {config.dataset} data: the '
          'model would be a non-private release of these images, and the budget registry would '
          'then refuse any DP run on them (no guarantee composes with it). Found false.')
    try:
      earlier = (ledger_lib.EarlierRuns(registry.earlier(run_id)) if config.dp else None)
    except PolicyError as e:
      raise ConfigError(f'Cannot train with DP on this data: {e} Its guarantee is void.') from None
  if example:
    fingerprint['privacy']['privacy_unit'] = 'example'
    # update_l2_bound is for the cross-silo secure sum only (and runs from before it resume).
    fingerprint['privacy']['example_dp'] = {k: v for k, v in config.example_dp.to_dict().items()
                                            if k != 'update_l2_bound'}
    plan = _Plan(None, None, example_level.calibrate(config, policy, images.labels, partition,
                                                     sampling_spec))
  else:
    plan = _calibrate(config, policy, sampling_spec, earlier)

  test_data = client_data_lib.central_dataset(images, partition.test_indices)
  clip = class_aware.AdaptiveClipSettings(config.clip.initial_l2_norm_clip,
                                          config.clip.target_unclipped_quantile,
                                          config.clip.learning_rate)

  def make_process(run_plan: _Plan):
    if example:
      factory = example_level.make_factory(run_plan.example, clip)
    elif config.dp:
      make_dp = (class_aware.ClassAwareFactory.shared_noise
                 if _dp_mechanism(config) == 'shared_noise' else class_aware.ClassAwareFactory.dp)
      factory = make_dp(
          {c: calibration.AdaptiveClipSplit.from_json_dict(s) for c, s in run_plan.splits.items()},
          clip)
    else:
      factory = class_aware.ClassAwareFactory.non_private()
    return process_lib.build_class_aware_process(lambda: build_keras_model(config), factory,
                                                 server_optimizer(config))

  learning_process = make_process(plan)
  trainer = local_training.LocalTrainer(lambda: build_keras_model(config),
                                        config.client.learning_rate, config.client.batch_size,
                                        config.client.local_epochs)
  if example:
    trainer = dp_sgd.DPSGDTrainer(lambda: build_keras_model(config), config.client.learning_rate,
                                  config.example_dp.local_steps)
  # The sample is drawn from a secret, never config.seed: amplification needs a secret sample.
  sampler = sampling_lib.make_sampler(sampling_spec, sampling_lib.new_secret())

  def new_ledger(run_plan: _Plan, state=None):
    whole_client = {c: calibration.AdaptiveClipSplit.from_json_dict(s).whole_client_noise_multiplier
                    for c, s in run_plan.splits.items()}
    if state is not None:
      return ledger_lib.PrivacyLedger.from_state(
          state, policy, sampling=sampling_spec, accountant=config.accountant,
          noise_mechanism=_dp_mechanism(config), earlier=earlier)
    return ledger_lib.PrivacyLedger(policy, run_plan.noise_multipliers, sampling_spec,
                                    config.accountant, _dp_mechanism(config), whole_client,
                                    earlier)

  ledger = new_ledger(plan) if config.dp and not example else None
  if example:
    ledger = example_level.RunLedger(policy, plan.example, config.example_dp.local_steps,
                                     config.accountant, sampling_spec)
  store = _CheckpointStore(os.path.join(run_dir, CHECKPOINT_DIR), config.checkpoints_to_keep)

  audit = audit_lib.AuditLog(os.path.join(run_dir, AUDIT_FILE))
  audit.repair_partial_tail()  # A record torn by a kill was never released: drop it.
  audit.head()  # A missing or unsafe custodian key fails here, before any training.

  def program_state(state, round_num, round_record, audit_head=None):
    return collections.OrderedDict(
        learning=state, round=np.int64(round_num),
        ledger=json.dumps(ledger.state() if ledger else None),
        sampler=json.dumps(sampler.state()),
        fingerprint=json.dumps(fingerprint, sort_keys=True, default=_json_default),
        plan=plan.to_json(),
        round_record=json.dumps(round_record, default=_json_default),
        audit_head=json.dumps(audit_head))

  state = learning_process.initialize()
  restored, round_num = store.load_latest(program_state(state, 0, {}))
  last_record = {}
  if restored is not None:
    saved_fingerprint = json.loads(_decode(restored['fingerprint']))
    differs = [s for s in _FINGERPRINT_SECTIONS if saved_fingerprint.get(s) != json.loads(
        json.dumps(fingerprint[s], sort_keys=True, default=_json_default))]
    if differs:
      raise ConfigError(
          f'Cannot resume the run in {run_dir}: its {", ".join(differs)} '
          f'{"differs" if len(differs) == 1 else "differ"} from this configuration. Use the '
          'original settings, or a new --experiment_name for a new run.')
    saved_plan = json.loads(_decode(restored['plan']))
    if saved_plan != json.loads(plan.to_json()):
      # total_rounds changed: keep the calibration the run started with.
      plan = _Plan(**saved_plan)
      learning_process = make_process(plan)
    state = restored['learning']
    round_num = int(restored['round'])
    sampler = sampling_lib.sampler_from_state(json.loads(_decode(restored['sampler'])),
                                              sampling_spec)
    try:
      if example:
        ledger = example_level.RunLedger(policy, plan.example, config.example_dp.local_steps,
                                         config.accountant, sampling_spec,
                                         state=json.loads(_decode(restored['ledger'])))
      elif ledger is not None:
        ledger = new_ledger(plan, json.loads(_decode(restored['ledger'])))
    except PolicyError as e:
      raise ConfigError(f'Cannot resume the run in {run_dir}: {e}') from None
    last_record = json.loads(_decode(restored['round_record']))
    logging.info('Resuming %s after round %d.', run_dir, round_num)
  released_rounds = max(audit.last_round() or 0, registered['rounds'] if registered else 0)
  if released_rounds > round_num:
    raise ConfigError(
        f'Cannot resume the run in {run_dir}: round {released_rounds} was released (audit log'
        f'{" and budget registry" if registered else ""}), but the newest readable checkpoint is '
        f'{"round " + str(round_num) if round_num else "missing"}. Retraining would release new '
        'models whose privacy spend the ledger could not count. The released rounds stand (their '
        'spend stays recorded); start a new run with a new --experiment_name.')
  if restored is not None:
    audit_lib.require_intact(run_dir, expected_head=json.loads(_decode(restored['audit_head'])),
                             pending_record=last_record.get('audit'))
  else:
    partition.save_manifest(os.path.join(run_dir, MANIFEST_FILE))

  _write_json_atomic(os.path.join(run_dir, CONFIG_FILE), {
      'config': json.loads(config.to_json_best_effort()), 'plan': dataclasses.asdict(plan),
      'data_report': images.report.summary(), 'num_clients': partition.num_clients,
      'sampling': sampling_spec.to_json_dict(), 'run_id': run_id})
  started = registered['started'] if registered else budget_registry.now_iso()

  def record_spend(round_count: int) -> None:
    """The run's spend so far into the dataset's registry, durably, before any release."""
    if registry is None:
      return
    groups = ledger.spend_groups() if ledger is not None else {'spend': {}, 'client_level': []}
    registry.record(run_id, budget_registry.make_entry(
        ledger is not None, round_count, config.accountant if ledger else None,
        sampling_spec if ledger else None, groups['spend'], started=started,
        client_level=groups['client_level']))

  if registry is not None and registered is None:
    record_spend(0)  # The run is known to the registry before its first release.
  csv_release = tff.program.CSVFileReleaseManager(os.path.join(run_dir, METRICS_FILE),
                                                  key_fieldname='round')
  tensorboard_release = tff.program.TensorBoardReleaseManager(
      os.path.join(run_dir, TENSORBOARD_DIR))
  keras_model = build_keras_model(config)

  def release(record: dict) -> None:
    """Publishes a checkpointed round's outputs; repeating it for the same round is harmless.

    The spend goes first to the registry and the keyed audit log (durable, append-only), then
    the published files.
    """
    record_spend(record['round'])
    if record.get("audit") and (audit.last_round() or 0) < record["round"]:
      audit.append(record['audit'])
    if ledger is not None:
      ledger.save(run_dir)
    metrics = record['metrics']
    asyncio.run(csv_release.release(metrics, key=record['round']))
    asyncio.run(tensorboard_release.release(
        {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)},
        key=record['round']))
    if on_round is not None:
      on_round(record)

  if last_record:
    release(last_record)

  stop_reason = 'completed'
  rounds_this_call = 0
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=config.total_rounds, initial=round_num, unit='round',
                    dynamic_ncols=True)
  try:
    while round_num < config.total_rounds:
      if stop_after_rounds is not None and rounds_this_call >= stop_after_rounds:
        stop_reason = 'stopped'
        break
      released = ledger.releasable() if ledger is not None else categories.CATEGORY_IDS
      if not released:
        stop_reason = 'budget_exhausted'
        break
      round_num += 1
      round_started = time.monotonic()
      state = state._replace(
          aggregator=class_aware.with_released_categories(
              state.aggregator,
              # Example level: one combined update in the first slot, always aggregated.
              categories.CATEGORY_IDS if example else released))
      sampled = sampler.sample(round_num)
      client_ids = [partition.client_ids[i] for i in sampled]
      before = state.global_model_weights
      initial = [np.asarray(w) for w in before.trainable]
      client_outputs = []
      site_outputs = {}
      for position, client_id in zip(sampled, client_ids):
        indices = partition.train_indices(client_id)
        if example:
          site_released = ledger.site_releasable(client_id)
          if not site_released:
            continue  # Every category is exhausted at this site: it sends nothing.
          site_outputs[client_id] = trainer.train(
              initial, model_input.to_model_input(images.images[indices]),
              images.labels[indices], plan=ledger.plans[client_id], released=site_released,
              sampling_seed=ledger.sampling_seed(round_num, int(position)))
          client_outputs.append(site_outputs[client_id])
          continue
        client_outputs.append(trainer.train(
            initial, model_input.to_model_input(images.images[indices]),
            images.labels[indices], shuffle_seed=(config.seed, round_num, int(position))))
      if example:
        client_ids = list(site_outputs)
      output = learning_process.next(
          state, [process_lib.as_sub_update_structs(o.sub_updates) for o in client_outputs])
      state = output.state
      round_seconds = time.monotonic() - round_started
      # metrics.csv may be published: no timing, no exact sample size (both confidential).
      metrics = {'round': round_num,
                 'update_norm': _update_norm(before, state.global_model_weights)}
      audit_record = {
          'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
          'round': round_num, 'participants': client_ids, 'num_participants': len(client_ids),
          'round_seconds': round_seconds,
          'categories_released': list(released), 'update_norm': metrics['update_norm'],
          'model_sha256': audit_lib.model_weights_sha256(
              _weights_list(state.global_model_weights)),
      }
      if example:
        ledger.record(site_outputs, state.aggregator)
        audit_record['epsilon_spent'] = {c: ledger.epsilon_spent(c)
                                         for c in categories.CATEGORY_IDS}
        metrics['example_level_epsilon'] = ledger.example.example_level_epsilon
        if ledger.client is not None:
          audit_record['client_level_epsilon'] = ledger.client.client_level_epsilon
          metrics['client_level_epsilon'] = ledger.client.client_level_epsilon
        for c in categories.CATEGORY_IDS:
          metrics[f'epsilon/{c}'] = ledger.epsilon_spent(c)
          metrics[f'released/{c}'] = int(c in released)
      elif ledger is not None:
        ledger.record_round(class_aware.dp_events(state.aggregator))
        norms = class_aware.clip_norms(state.aggregator)
        audit_record['clip_norms'] = norms
        audit_record['epsilon_spent'] = {c: ledger.epsilon_spent(c)
                                         for c in categories.CATEGORY_IDS}
        audit_record['client_level_epsilon'] = ledger.client_level_epsilon
        metrics['client_level_epsilon'] = ledger.client_level_epsilon
        for c in categories.CATEGORY_IDS:
          metrics[f'epsilon/{c}'] = ledger.epsilon_spent(c)
          metrics[f'clip_norm/{c}'] = norms[c]
          metrics[f'released/{c}'] = int(c in released)
      else:
        train = local_training.summarize_train_metrics(client_outputs)
        metrics.update({f'train/{k}': v for k, v in train.items()})
      if round_num % config.eval_every == 0 or round_num == config.total_rounds:
        state.global_model_weights.assign_weights_to(keras_model)
        result = evaluation.evaluate(keras_model, test_data)
        metrics.update({f'eval/{k}': v for k, v in result.items() if k != 'confusion_matrix'})
        metrics['eval/confusion_matrix'] = json.dumps(result['confusion_matrix'])
      record = {'round': round_num, 'audit': audit_record, 'metrics': metrics}
      store.save(program_state(state, round_num, record, audit.head()), round_num)
      release(record)
      rounds_this_call += 1
      if bar is not None:
        bar.set_postfix(round_s=f'{round_seconds:.1f}')
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()

  state.global_model_weights.assign_weights_to(keras_model)
  final = evaluation.evaluate(keras_model, test_data)
  if ledger is not None and ledger.all_exhausted and stop_reason == 'completed':
    stop_reason = 'budget_exhausted'
  return RunResult(run_dir=run_dir, rounds_completed=round_num, stop_reason=stop_reason,
                   evaluation=final, ledger=ledger, keras_model=keras_model, policy=policy)


SAVED_MODEL_DIR = run_files.SAVED_MODEL_DIR
MODEL_CARD_FILE = run_files.MODEL_CARD_FILE


def export(result: RunResult) -> str:
  """Exports the run's final model to run_dir/saved_model and writes run_dir/model_card.json.

  A previous export of the same run is replaced: it is always regenerated from the checkpoint.
  """
  with fileio.owner_only():
    return _export(result)


def _export(result: RunResult) -> str:
  # pylint: disable=g-import-not-at-top
  import shutil
  from tff_medical.export import saved_model
  # pylint: enable=g-import-not-at-top
  export_dir = os.path.join(result.run_dir, SAVED_MODEL_DIR)
  ledger_json = result.ledger.to_json_dict() if result.ledger is not None else None
  with open(os.path.join(result.run_dir, CONFIG_FILE)) as f:
    run_config = json.load(f)
  data_source = run_config['config']['dataset']
  evaluation_source = None
  deployment = run_config.get('deployment')
  if isinstance(deployment, dict):
    # Cross-silo: the model learned from the sites' own images, which the coordinator never
    # sees; config.dataset is only the coordinator's evaluation data ('none' reads as phantoms).
    evaluation_source = (None if deployment.get('eval_dataset') in (None, 'none')
                         else data_source)
    data_source = None
  confusion = result.evaluation.get('confusion_matrix') or [[0]] * categories.NUM_CATEGORIES
  card = dict(data_source=data_source, rounds=result.rounds_completed,
              # NaN: not measured (a cross-silo coordinator without its own evaluation set).
              accuracy_per_category={c: (result.evaluation[f'accuracy/{c}'] if np.isfinite(
                  result.evaluation[f'accuracy/{c}']) else None)
                                     for c in categories.CATEGORY_IDS},
              eval_counts_per_category={c: int(sum(row))
                                        for c, row in zip(categories.CATEGORY_IDS, confusion)},
              evaluation_data_source=evaluation_source,
              **saved_model.describe_model(result.keras_model))
  if os.path.exists(export_dir):
    shutil.rmtree(export_dir)
  saved_model.export_saved_model(result.keras_model, export_dir, result.policy, ledger_json,
                                 model_card_extra=card)
  saved_model.write_model_card(
      os.path.join(result.run_dir, MODEL_CARD_FILE), result.policy, ledger_json,
      model_sha256=audit_lib.model_weights_sha256(result.keras_model.get_weights()), **card)
  return export_dir


def config_of_run(run_dir: str):
  """The ConfigDict a run was started with, from its config.json (for export and resume tools)."""
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f'run_dir must hold a run ({CONFIG_FILE}). Found none in {run_dir}.')
  with open(path) as f:
    return config_from_json_dict(json.load(f)['config'])


def config_from_json_dict(raw: dict):
  """A ConfigDict from its JSON form (config.to_json_best_effort()), its tuple restored."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  return ml_collections.ConfigDict(
      dict(raw, model=dict(raw['model'], conv_filters=tuple(raw['model']['conv_filters']))))
