"""A run directory's record of rounds, shared by the simulation and the cross-silo coordinator.

Both commit a round the same way (docs/ARCHITECTURE.md, "A round's commit"): checkpoint, then
the spend (budget registry, keyed audit log), then the published files. A resume checks the
settings and refuses when a round was released beyond the newest readable checkpoint.
"""

import asyncio
import collections
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tree

from tff_medical import categories
from tff_medical import fileio
from tff_medical import run_files
from tff_medical.errors import ConfigError
from tff_medical.errors import PolicyError
from tff_medical.monitoring import audit as audit_lib
from tff_medical.privacy import accounting
from tff_medical.privacy import budget_registry
from tff_medical.privacy import calibration
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import shared_noise_calibration
from tff_medical.training import evaluation

# Why a run stopped (RunResult.stop_reason).
COMPLETED = 'completed'
STOPPED = 'stopped'  # stop_after_rounds (tests of resume)
BUDGET_EXHAUSTED = 'budget_exhausted'
NOT_ENOUGH_SITES = 'not_enough_sites'
ROUNDS_ABANDONED = 'rounds_abandoned'


@dataclasses.dataclass
class RunResult:
  run_dir: str
  rounds_completed: int
  stop_reason: str
  evaluation: dict
  ledger: Any  # A PrivacyLedger, an example-level ledger view, or None without DP.
  keras_model: tf.keras.Model
  policy: policy_lib.PrivacyPolicy
  saved_model_dir: Optional[str] = None
  # Seconds this invocation spent committing rounds, by step (RunRecord.seconds).
  commit_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Plan:
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


def dp_mechanism(config) -> str:
  # A config.json written before dp_mechanism existed has none: per-category noise.
  return config.get('dp_mechanism', 'per_category_noise')


def calibrate(config, policy, sampling_spec,
              earlier: Optional[ledger_lib.EarlierRuns] = None) -> Plan:
  """The client-level plan: each category's noise multiplier and adaptive-clip split.

  Raises:
    ConfigError: earlier runs on the same data leave too little of the policy.
  """
  if not config.dp:
    return Plan(None, None)
  spent_before = None
  if earlier is not None and earlier.runs:
    spent_before = {c: {r: earlier.events(c, r) for r in accounting.Relation}
                    for c in categories.CATEGORY_IDS}
  # Shared noise: one clipped count, so one count stddev for every category's split.
  splits_fn = (shared_noise_calibration.shared_noise_splits
               if dp_mechanism(config) == 'shared_noise' else calibration.category_splits)
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
    ledger = ledger_lib.PrivacyLedger(policy, {c: 1.0 for c in categories.CATEGORY_IDS},
                                      sampling_spec, config.accountant, earlier=earlier)
    spent = ', '.join(f'{c} {ledger.epsilon_spent(c):.4g} of {policy.budget(c).epsilon:g}'
                      for c in categories.CATEGORY_IDS)
    raise ConfigError(f'{e} Earlier runs on the same data ({len(earlier.runs)}) leave too little '
                      f'of the policy for {config.total_rounds} more rounds: {spent}.') from None
  return Plan(noise, {c: s.to_json_dict() for c, s in splits.items()})


def whole_client_noise_multipliers(plan: Plan) -> dict[str, float]:
  """Each category's multiplier under relation (b), a whole client added or removed."""
  return {c: calibration.AdaptiveClipSplit.from_json_dict(s).whole_client_noise_multiplier
          for c, s in plan.splits.items()}


def json_default(value):
  if isinstance(value, (tuple, np.ndarray)):
    return list(value)
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f'not JSON serializable: {type(value).__name__}')


def to_json(value) -> str:
  return json.dumps(value, sort_keys=True, default=json_default)


def write_json_atomic(path: str, value: Any) -> None:
  fileio.write_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=json_default))


def from_checkpoint(value) -> Any:
  """A JSON field of a restored checkpoint (TFF gives strings back as bytes)."""
  return json.loads(value.decode() if isinstance(value, bytes) else str(value))


def update_norm(before, after) -> float:
  """L2 norm of the change between two lists of weight arrays."""
  return float(np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64))**2)
                           for a, b in zip(before, after))))


def new_run_id() -> str:
  return secrets.token_hex(16)


class CheckpointStore:
  """A run's round checkpoints: one owner-only .npz a round, written whole or not at all.

  Own code rather than tff.program.FileProgramStateManager, which writes a SavedModel a round:
  3.6 s a round at the demo's shape against 13 ms for the same 135 leaves in one .npz (measured
  once on 2 loaded cores; make bench shows the checkpoint step's time a round). The layout stays TFF's (round_N folders, the newest `keep_total`
  kept), and folders TFF wrote (no state.npz) are still read through TFF.
  """

  _PREFIX = 'round_'
  _STATE_FILE = 'state.npz'

  def __init__(self, root: str, keep_total: int):
    self._root = root
    self._keep_total = keep_total
    # A process killed while saving leaves round_N_tempXXXX behind (renamed into place only when
    # complete): never a version, only disk.
    if os.path.isdir(root):
      for name in os.listdir(root):
        if name.startswith(self._PREFIX) and '_temp' in name:
          shutil.rmtree(os.path.join(root, name), ignore_errors=True)

  def _versions(self) -> list[int]:
    if not os.path.isdir(self._root):
      return []
    return sorted(int(name[len(self._PREFIX):]) for name in os.listdir(self._root)
                  if name.startswith(self._PREFIX) and name[len(self._PREFIX):].isdigit())

  def _path(self, version: int) -> str:
    return os.path.join(self._root, f'{self._PREFIX}{version}')

  def load_latest(self, structure) -> tuple[Optional[Any], int]:
    versions = self._versions()
    for version in reversed(versions):
      try:
        return self._load(version, structure), version
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint version %d unreadable (%s); trying an older one.', version, e)
    if versions:
      # Starting over would overwrite a run's state and ledger: refuse instead. A training state
      # of another shape (model, aggregator or privacy settings) is the usual cause.
      raise ConfigError(
          f'Cannot resume the run in {os.path.dirname(self._root)}: none of its checkpoints '
          f'(rounds {", ".join(map(str, versions))}) matches the training state of this '
          'configuration (a different model, aggregator or privacy setting?). Use the original '
          'settings, or a new --experiment_name for a new run.')
    return None, 0

  def _load(self, version: int, structure) -> Any:
    path = os.path.join(self._path(version), self._STATE_FILE)
    if not os.path.exists(path):  # Written by TFF's FileProgramStateManager.
      manager = tff.program.FileProgramStateManager(self._root, prefix=self._PREFIX)
      return asyncio.run(manager.load(version, structure))
    leaves = tree.flatten(structure)
    with np.load(path, allow_pickle=False) as saved:
      if len(saved.files) != len(leaves):
        raise ValueError(f'{len(saved.files)} values where this configuration has {len(leaves)}')
      values = []
      for i, leaf in enumerate(leaves):
        value = saved[str(i)]
        if value.shape != np.shape(leaf):
          raise ValueError(f'value {i} has shape {value.shape}, not {np.shape(leaf)}')
        values.append(value.item() if value.dtype.kind in 'SU' and not value.ndim else value)
    return tree.unflatten_as(structure, values)

  def save(self, program_state, version: int) -> None:
    arrays = {str(i): np.asarray(leaf) for i, leaf in enumerate(tree.flatten(program_state))}
    unsupported = [k for k, a in arrays.items() if a.dtype.kind == 'O']
    if unsupported:
      raise TypeError(f'checkpoint values must be arrays, numbers or strings. Found objects at '
                      f'{", ".join(unsupported)}.')
    os.makedirs(self._root, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=f'{self._PREFIX}{version}_temp', dir=self._root)
    with open(os.path.join(temp, self._STATE_FILE), 'wb') as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.rename(temp, self._path(version))
    fileio.fsync_dir(self._root)
    for old in self._versions()[:-self._keep_total]:
      shutil.rmtree(self._path(old), ignore_errors=True)


class RegisteredSpend:
  """The run's spend in its dataset's budget registry, recorded before any release."""

  def __init__(self, registry: budget_registry.BudgetRegistry, run_id: str, accountant: str,
               sampling_spec):
    self._registry, self._run_id = registry, run_id
    self._accountant, self._spec = accountant, sampling_spec
    self.entry = registry.entry(run_id)  # None for a run new to the registry.
    self._started = self.entry['started'] if self.entry else budget_registry.now_iso()

  @property
  def rounds(self) -> int:
    return self.entry['rounds'] if self.entry else 0

  def earlier_runs(self) -> ledger_lib.EarlierRuns:
    """Raises PolicyError where the data had a non-private release."""
    return ledger_lib.EarlierRuns(self._registry.earlier(self._run_id))

  def record(self, ledger, round_count: int) -> None:
    groups = ledger.spend_groups() if ledger is not None else {'spend': {}, 'client_level': []}
    self._registry.record(self._run_id, budget_registry.make_entry(
        ledger is not None, round_count, self._accountant if ledger else None,
        self._spec if ledger else None, groups['spend'], started=self._started,
        client_level=groups['client_level']))


def config_run_id(run_dir: str) -> str:
  """The run id kept in config.json, or a new one for a new run directory."""
  try:
    with open(os.path.join(run_dir, run_files.CONFIG_FILE)) as f:
      run_id = json.load(f).get('run_id')
  except (OSError, ValueError, AttributeError):
    run_id = None
  return run_id if isinstance(run_id, str) and run_id else new_run_id()


def round_audit_record(round_num: int, participants: list[str], released, norm: float,
                       weights: list[np.ndarray], **fields) -> dict[str, Any]:
  """A round's confidential audit record: who took part, what was released, the model's hash."""
  return {'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'round': round_num,
          'participants': participants, 'num_participants': len(participants),
          'categories_released': list(released), 'update_norm': norm,
          'model_sha256': audit_lib.model_weights_sha256(weights), **fields}


def client_level_outputs(ledger, norms: dict[str, float], released
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(metrics, audit fields) of a client-level DP round: epsilon and clip norm per category."""
  metrics = {'client_level_epsilon': ledger.client_level_epsilon}
  for c in categories.CATEGORY_IDS:
    metrics[f'epsilon/{c}'] = ledger.epsilon_spent(c)
    metrics[f'clip_norm/{c}'] = norms[c]
    metrics[f'released/{c}'] = int(c in released)
  return metrics, {'clip_norms': norms, 'client_level_epsilon': ledger.client_level_epsilon,
                   'epsilon_spent': {c: ledger.epsilon_spent(c)
                                     for c in categories.CATEGORY_IDS}}


def example_level_outputs(ledger, released) -> tuple[dict[str, Any], dict[str, Any]]:
  """(metrics, audit fields) of an example-level round (ledger: example_level.LedgerView)."""
  spent = {c: ledger.epsilon_spent(c) for c in categories.CATEGORY_IDS}
  metrics = {'example_level_epsilon': ledger.example.example_level_epsilon}
  audit_fields = {'epsilon_spent': spent}
  if ledger.client is not None:
    metrics['client_level_epsilon'] = audit_fields['client_level_epsilon'] = (
        ledger.client.client_level_epsilon)
  for c in categories.CATEGORY_IDS:
    metrics[f'epsilon/{c}'] = spent[c]
    metrics[f'released/{c}'] = int(c in released)
  return metrics, audit_fields


def evaluate_into(metrics: dict[str, Any], keras_model, data) -> None:
  """Adds the test evaluation to a round's metrics (the confusion matrix as JSON)."""
  result = evaluation.evaluate(keras_model, data)
  metrics.update({f'eval/{k}': v for k, v in result.items() if k != 'confusion_matrix'})
  metrics['eval/confusion_matrix'] = json.dumps(result['confusion_matrix'])


def final_evaluation(keras_model, data) -> dict[str, Any]:
  """The final model's evaluation; NaN accuracies where there is no evaluation set."""
  if data is not None:
    return evaluation.evaluate(keras_model, data)
  final = {f'accuracy/{c}': float('nan') for c in categories.CATEGORY_IDS}
  final['accuracy'] = float('nan')
  return final


def final_stop_reason(stop_reason: str, ledger) -> str:
  if ledger is not None and ledger.all_exhausted and stop_reason == COMPLETED:
    return BUDGET_EXHAUSTED
  return stop_reason


class RunRecord:
  """One run directory: its checkpoints, audit log, registered spend and published files.

  A round is committed by `commit`: checkpoint first, then `release` (registry, audit log,
  ledger, metrics, TensorBoard); releasing the same round again is harmless, which is how a
  resumed run finishes a release a kill interrupted.
  """

  def __init__(self, run_dir: str, fingerprint: dict[str, Any], *, checkpoints_to_keep: int,
               spend: Optional[RegisteredSpend] = None, tensorboard: bool = True,
               on_round: Optional[Callable[[dict], None]] = None):
    """`fingerprint`: {section: settings} a resumed run must share with the run it continues."""
    self.run_dir = run_dir
    self._fingerprint = json.loads(to_json(fingerprint))
    # Seconds spent committing rounds, by step (the benchmark's per-round overhead split).
    self.seconds: collections.Counter = collections.Counter()
    os.makedirs(run_dir, exist_ok=True)
    self._store = CheckpointStore(os.path.join(run_dir, run_files.CHECKPOINT_DIR),
                                  checkpoints_to_keep)
    self.audit = audit_lib.AuditLog(os.path.join(run_dir, run_files.AUDIT_FILE))
    self.audit.repair_partial_tail()  # A record torn by a kill was never released: drop it.
    self.audit.head()  # A missing or unsafe custodian key fails here, before any training.
    self._spend = spend
    self._on_round = on_round
    self._csv = tff.program.CSVFileReleaseManager(
        os.path.join(run_dir, run_files.METRICS_FILE), key_fieldname='round')
    self._tensorboard = (tff.program.TensorBoardReleaseManager(
        os.path.join(run_dir, run_files.TENSORBOARD_DIR)) if tensorboard else None)

  def program_state(self, fields: dict[str, Any], round_num: int, *, plan_json: str,
                    ledger_state, round_record, audit_head=None) -> collections.OrderedDict:
    """The checkpointed state: the caller's training fields and the record's own."""
    return collections.OrderedDict(
        fields, round=np.int64(round_num), ledger=json.dumps(ledger_state),
        fingerprint=json.dumps(self._fingerprint, sort_keys=True), plan=plan_json,
        round_record=json.dumps(round_record, default=json_default),
        audit_head=json.dumps(audit_head))

  def restore(self, structure, unit) -> tuple[Optional[Any], int, dict[str, Any]]:
    """(restored state or None, its round, its round record), after the resume checks.

    The privacy unit (training/privacy_unit.py) takes its plan and ledger from the checkpoint.

    Raises:
      ConfigError: the settings differ from the checkpoint's, or a round was released beyond
        the newest readable checkpoint (retraining would release uncounted models).
    """
    restored, round_num = self._store.load_latest(structure)
    record = {}
    if restored is not None:
      saved = from_checkpoint(restored['fingerprint'])
      differs = sorted(s for s in set(saved) | set(self._fingerprint)
                       if saved.get(s) != self._fingerprint.get(s))
      if differs:
        raise ConfigError(
            f'Cannot resume the run in {self.run_dir}: its {", ".join(differs)} '
            f'{"differs" if len(differs) == 1 else "differ"} from this configuration. Use the '
            'original settings, or a new --experiment_name for a new run.')
      try:
        unit.restore(restored)
      except PolicyError as e:
        raise ConfigError(f'Cannot resume the run in {self.run_dir}: {e}') from None
      record = from_checkpoint(restored['round_record'])
      round_num = int(restored['round'])
    registered = self._spend is not None and self._spend.entry is not None
    released_rounds = max(self.audit.last_round() or 0,
                          self._spend.rounds if self._spend is not None else 0)
    if released_rounds > round_num:
      raise ConfigError(
          f'Cannot resume the run in {self.run_dir}: round {released_rounds} was released (audit '
          f'log{" and budget registry" if registered else ""}), but the newest readable '
          f'checkpoint is {"round " + str(round_num) if round_num else "missing"}. Retraining '
          'would release new models whose privacy spend the ledger could not count. The released '
          'rounds stand (their spend stays recorded); start a new run with a new '
          '--experiment_name.')
    if restored is not None:
      audit_lib.require_intact(self.run_dir,
                               expected_head=from_checkpoint(restored['audit_head']),
                               pending_record=record.get('audit'))
      logging.info('Resuming %s after round %d.', self.run_dir, round_num)
    return restored, round_num, record

  def write_config(self, value: dict[str, Any]) -> None:
    write_json_atomic(os.path.join(self.run_dir, run_files.CONFIG_FILE), value)

  def start(self, ledger, last_record: dict[str, Any]) -> None:
    """Registers a new run's spend before its first release; finishes a resumed release."""
    if self._spend is not None and self._spend.entry is None:
      self._spend.record(ledger, 0)
    if last_record:
      self.release(last_record, ledger)
    self.seconds.clear()  # Counts the rounds this invocation commits, not a repeated release.

  def release(self, record: dict[str, Any], ledger) -> None:
    """Publishes a checkpointed round: the spend first (registry, audit log), then the files."""
    started = time.perf_counter()
    if self._spend is not None:
      self._spend.record(ledger, record['round'])
    if record.get('audit') and (self.audit.last_round() or 0) < record['round']:
      self.audit.append(record['audit'])
    spent = time.perf_counter()
    if ledger is not None:
      ledger.save(self.run_dir)
    metrics = record['metrics']
    asyncio.run(self._csv.release(metrics, key=record['round']))
    if self._tensorboard is not None:
      asyncio.run(self._tensorboard.release(
          {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)},
          key=record['round']))
    published = time.perf_counter()
    self.seconds['spend'] += spent - started
    self.seconds['publish'] += published - spent
    if self._on_round is not None:
      self._on_round(record)
      self.seconds['on_round'] += time.perf_counter() - published

  def commit(self, program_state, record: dict[str, Any], ledger) -> None:
    """Checkpoints a finished round, then releases it."""
    started = time.perf_counter()
    self._store.save(program_state, record['round'])
    self.seconds['checkpoint'] += time.perf_counter() - started
    self.release(record, ledger)
