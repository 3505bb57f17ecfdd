"""The simulation: data, partition, the calibrated class-aware process, and the round loop.

Rounds are committed and released by the run record (training/run_record.py).
"""

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
from tff_medical.aggregation import block as block_lib
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
from tff_medical.privacy import budget_registry
from tff_medical.privacy import calibration
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling as sampling_lib
from tff_medical.training import cohort
from tff_medical.training import canaries
from tff_medical.training import config as config_lib
from tff_medical.training import dp_sgd
from tff_medical.training import example_canaries
from tff_medical.training import example_level
from tff_medical.training import local_training
from tff_medical.training import privacy_unit
from tff_medical.training import process as process_lib
from tff_medical.training import run_record

CHECKPOINT_DIR = run_files.CHECKPOINT_DIR
CONFIG_FILE = run_files.CONFIG_FILE
METRICS_FILE = run_files.METRICS_FILE
AUDIT_FILE = run_files.AUDIT_FILE
TENSORBOARD_DIR = run_files.TENSORBOARD_DIR
MANIFEST_FILE = run_files.MANIFEST_FILE

RunResult = run_record.RunResult
# Clients a TFF client value carries in the per-category DP path (aggregation/block.py): 128 to
# 256 were fastest at 1,000 clients a round on 2 cores.
CLIENTS_PER_BLOCK = 128


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
class _Data:
  """The run's images, their partition into clients and the held-out test set."""

  images: source_lib.LabeledImages
  partition: partition_lib.Partition
  test: Any

  @classmethod
  def load(cls, config) -> '_Data':
    images = load_images(config)
    logging.info('%s', images.report.summary())
    partition = partition_lib.partition(
        images.labels, config.num_clients, config.partition, alpha=config.dirichlet_alpha,
        seed=config.seed, test_fraction=config.test_fraction,
        holdout_fraction=config.holdout_fraction, size_skew=config.size_skew)
    return cls(images, partition,
               client_data_lib.central_dataset(images, partition.test_indices))

  def client(self, client_id: str) -> tuple[np.ndarray, np.ndarray]:
    indices = self.partition.train_indices(client_id)
    return model_input.to_model_input(self.images.images[indices]), self.images.labels[indices]


def _clip_settings(config) -> class_aware.AdaptiveClipSettings:
  return class_aware.AdaptiveClipSettings(config.clip.initial_l2_norm_clip,
                                          config.clip.target_unclipped_quantile,
                                          config.clip.learning_rate)


class _ClientUnit(privacy_unit.ClientLevel):
  """Client level in the simulation: local training, then the class-aware TFF aggregator."""

  def __init__(self, config, policy, sampling_spec, data: _Data, earlier=None):
    super().__init__(config, policy, sampling_spec, earlier)
    del data  # Client-level calibration needs only the sampling.
    # The sampled clients trained together: LocalTrainer's result, in a few compiled calls.
    self.trainer = cohort.CohortTrainer(
        lambda: build_keras_model(config), config.client.learning_rate,
        config.client.batch_size, config.client.local_epochs)
    self.plan_restored()
    self._norms, self._train_metrics = {}, {}

  def plan_restored(self) -> None:
    self.clients_per_block = None
    if self.ledger is None:
      factory = class_aware.ClassAwareFactory.non_private()
    else:
      shared_noise = run_record.dp_mechanism(self._config) == 'shared_noise'
      make_dp = (class_aware.ClassAwareFactory.shared_noise if shared_noise
                 else class_aware.ClassAwareFactory.dp)
      splits = {c: calibration.AdaptiveClipSplit.from_json_dict(s)
                for c, s in self.plan.splits.items()}
      factory = make_dp(splits, _clip_settings(self._config))
      if canaries.enabled(self._config):
        factory = canaries.tapped_factory(factory)  # Sub-aggregates measured for the audit.
      elif not shared_noise:
        # The same mechanism and state over blocks of clients: no per-client cost in TFF.
        self.clients_per_block = CLIENTS_PER_BLOCK
        factory = block_lib.BlockClassAwareFactory.dp(
            splits, _clip_settings(self._config), clients_per_block=CLIENTS_PER_BLOCK)
    self.process = _learning_process(self._config, factory, self.clients_per_block)

  def aggregated(self, released) -> tuple[str, ...]:
    return released

  def train(self, data: _Data, sampled, initial, round_num: int) -> dict[str, Any]:
    """{client id: output} of the round's sampled clients, in sampled order."""
    client_ids = [data.partition.client_ids[position] for position in sampled]
    trained = self.trainer.train(
        initial, [data.client(client_id) for client_id in client_ids],
        [(self._config.seed, round_num, int(position)) for position in sampled])
    return dict(zip(client_ids, trained))

  def record(self, aggregator_state, outputs: dict[str, Any]) -> None:
    if self.ledger is None:
      self._train_metrics = local_training.summarize_train_metrics(list(outputs.values()))
      return
    self.ledger.record_round(class_aware.dp_events(aggregator_state))
    self._norms = class_aware.clip_norms(aggregator_state)

  def clip_norms(self) -> dict[str, float]:
    return self._norms

  def round_outputs(self, released) -> tuple[dict[str, Any], dict[str, Any]]:
    if self.ledger is None:
      return {f'train/{k}': v for k, v in self._train_metrics.items()}, {}
    return super().round_outputs(released)


class _ExampleUnit(privacy_unit.ExampleLevel):
  """Example level in the simulation: DP-SGD at each client (a site), a plain or stacked mean."""

  def __init__(self, config, policy, sampling_spec, data: _Data, earlier=None):
    del earlier  # Example-level runs are not in the budget registry (README "Budget").
    self._config, self._policy, self._spec = config, policy, sampling_spec
    self.plan = run_record.Plan(None, None, example_level.calibrate(
        config, policy, data.images.labels, data.partition, sampling_spec))
    self.ledger = self._new_ledger()
    self.trainer = dp_sgd.DPSGDTrainer(lambda: build_keras_model(config),
                                       config.client.learning_rate, config.example_dp.local_steps)
    self.site_audit = None  # An audit run's canary examples (example_canaries.SiteAudit).
    self.plan_restored()

  def _new_ledger(self, state=None) -> example_level.RunLedger:
    return example_level.RunLedger(self._policy, self.plan.example,
                                   self._config.example_dp.local_steps, self._config.accountant,
                                   self._spec, state=state)

  def plan_restored(self) -> None:
    self.process = _learning_process(
        self._config, example_level.make_factory(self.plan.example, _clip_settings(self._config)))

  def fingerprint_privacy(self) -> dict[str, Any]:
    # update_l2_bound is for the cross-silo secure sum only (and runs from before it resume).
    settings = dict(privacy_unit.client_dp_settings(self._config), privacy_unit='example',
                    example_dp={k: v for k, v in self._config.example_dp.to_dict().items()
                                if k != 'update_l2_bound'})
    if canaries.enabled(self._config):  # The canary statistics are of one site's examples.
      settings['audit_site'] = self._config.audit.get('example_site', '')
    return settings

  def restore(self, restored) -> None:
    self.restore_plan(restored)
    self.ledger = self._new_ledger(run_record.from_checkpoint(restored['ledger']))

  def aggregated(self, released) -> tuple[str, ...]:
    del released  # One combined update in the first slot, always aggregated.
    return categories.CATEGORY_IDS

  def train(self, data: _Data, sampled, initial, round_num: int) -> dict[str, Any]:
    """{site id: output} of the sampled sites with a category left, in sampled order."""
    outputs = {}
    for position in sampled:
      site_id = data.partition.client_ids[position]
      site_released = self.ledger.site_releasable(site_id)
      if site_released:  # A site with every category exhausted sends nothing.
        audited = self.site_audit is not None and site_id == self.site_audit.site_id
        outputs[site_id] = self.trainer.train(
            initial, *data.client(site_id), plan=self.ledger.plans[site_id],
            released=site_released,
            sampling_seed=self.ledger.sampling_seed(round_num, int(position)),
            extra_records=(self.site_audit.extra_records(
                round_num, self.ledger.plans[site_id], site_released) if audited else None))
        if audited:
          self.site_audit.site_trained(outputs[site_id], site_released)
    return outputs

  def record(self, aggregator_state, outputs: dict[str, Any]) -> None:
    self.ledger.record(outputs, aggregator_state)


def _learning_process(config, factory, clients_per_block=None):
  return process_lib.build_class_aware_process(lambda: build_keras_model(config), factory,
                                               server_optimizer(config), clients_per_block)


def _fingerprint(config, policy, sampling_spec, partition, unit) -> dict[str, Any]:
  """The settings a resumed run must share with the run it continues."""
  fingerprint = {
      'policy': policy.to_json_dict(),
      'sampling': sampling_spec.to_json_dict(),
      'dataset': {'dataset': config.dataset, 'data_dir': config.data_dir,
                  'num_per_category': config.num_per_category
                                      if sources.get(config.dataset).generated else None},
      'partition': partition.fingerprint(),
      'privacy': unit.fingerprint_privacy(),
      'model': config.model.to_dict(),
  }
  if config.dataset == 'pacs':
    # What was asked of which PACS (never the credentials): another query is other data.
    fingerprint['dataset']['pacs'] = {k: config.pacs.get(k, '') for k in (
        'url', 'protocol', 'called_ae', 'modalities', 'study_date', 'study_list_file')}
  difficulty = config.get('phantom_difficulty', phantoms.DEFAULT_DIFFICULTY)
  if config.dataset == 'phantoms' and difficulty != phantoms.DEFAULT_DIFFICULTY:
    # Only when set: run directories from before the field existed still resume.
    fingerprint['dataset']['phantom_difficulty'] = difficulty
  return fingerprint


def _registered_spend(config, images, run_id: str, sampling_spec
                      ) -> tuple[Optional[run_record.RegisteredSpend],
                                 Optional[ledger_lib.EarlierRuns]]:
  """The dataset's budget registry entry and earlier runs; (None, None) for generated images
  (nobody to protect) and example level (not registered)."""
  if sources.get(config.dataset).generated or example_level.is_example(config):
    return None, None
  spend = run_record.RegisteredSpend(
      budget_registry.BudgetRegistry(
          config.get('budget_registry_dir') or budget_registry.default_registry_dir(),
          budget_registry.dataset_fingerprint(images.images, images.labels)),
      run_id, config.accountant, sampling_spec)
  if not config.dp:
    if not config.get('release_non_private', False):
      raise ConfigError(
          f'release_non_private must be true to train without DP on {config.dataset} data: the '
          'model would be a non-private release of these images, and the budget registry would '
          'then refuse any DP run on them (no guarantee composes with it). Found false.')
    return spend, None
  try:
    return spend, spend.earlier_runs()
  except PolicyError as e:
    raise ConfigError(f'Cannot train with DP on this data: {e} Its guarantee is void.') from None


def run(config, run_dir: str, *, progress: bool = False,
        on_round: Optional[Callable[[dict], None]] = None,
        stop_after_rounds: Optional[int] = None) -> RunResult:
  """Trains (or resumes) the configured run in `run_dir` (docs/ARCHITECTURE.md, "A round's commit").

  `stop_after_rounds` ends this invocation after that many new rounds (for tests of resume).
  """
  with fileio.owner_only():
    return _run(config, run_dir, progress=progress, on_round=on_round,
                stop_after_rounds=stop_after_rounds)


def _run(config, run_dir: str, *, progress: bool, on_round, stop_after_rounds) -> RunResult:
  config_lib.validate(config)
  policy = policy_lib.load_policy(config.policy or policy_lib.DEFAULT_POLICY_PATH)
  data = _Data.load(config)
  spec = sampling_lib.SamplingSpec(config.sampling, data.partition.num_clients,
                                   config.clients_per_round)
  run_id = run_record.config_run_id(run_dir)
  spend, earlier = _registered_spend(config, data.images, run_id, spec)
  unit = (_ExampleUnit if example_level.is_example(config) else _ClientUnit)(
      config, policy, spec, data, earlier)
  record = run_record.RunRecord(
      run_dir, _fingerprint(config, policy, spec, data.partition, unit),
      checkpoints_to_keep=config.checkpoints_to_keep, spend=spend, on_round=on_round)
  # The sample is drawn from a secret, never config.seed: amplification needs a secret sample.
  sampler = sampling_lib.make_sampler(spec, sampling_lib.new_secret())
  state = unit.process.initialize()

  def program_state(round_num: int, round_record: dict, audit_head=None):
    return record.program_state(
        {'learning': state, 'sampler': json.dumps(sampler.state())}, round_num,
        plan_json=unit.plan_json(), ledger_state=unit.ledger_state(), round_record=round_record,
        audit_head=audit_head)

  restored, round_num, last_record = record.restore(program_state(0, {}), unit)
  if restored is not None:
    state = restored['learning']
    sampler = sampling_lib.sampler_from_state(run_record.from_checkpoint(restored['sampler']),
                                              spec)
  else:
    data.partition.save_manifest(os.path.join(run_dir, MANIFEST_FILE))
  record.write_config({
      'config': json.loads(config.to_json_best_effort()), 'plan': unit.plan_record(),
      'data_report': data.images.report.summary(), 'num_clients': data.partition.num_clients,
      'sampling': spec.to_json_dict(), 'run_id': run_id,
      'audit_run': canaries.enabled(config)})
  record.start(unit.ledger, last_record)
  if example_level.is_example(config):  # Canary examples at one site.
    canary_audit = unit.site_audit = example_canaries.SiteAudit.for_run(
        config, run_dir, sampler, state.global_model_weights.trainable, round_num,
        data.partition.client_ids, unit.ledger.plans)
  else:
    canary_audit = canaries.ProgramAudit.maybe(config, run_dir, sampler,
                                               state.global_model_weights.trainable, round_num)
  keras_model = build_keras_model(config)
  stop_reason, rounds_this_call = run_record.COMPLETED, 0
  bar = _progress_bar(config.total_rounds, round_num) if progress else None
  try:
    while round_num < config.total_rounds:
      if stop_after_rounds is not None and rounds_this_call >= stop_after_rounds:
        stop_reason = run_record.STOPPED
        break
      released = unit.releasable()
      if not released:
        stop_reason = run_record.BUDGET_EXHAUSTED
        break
      round_num += 1
      state, round_record = _train_round(config, unit, data, state, sampler.sample(round_num),
                                         round_num, released, keras_model, canary_audit)
      record.commit(program_state(round_num, round_record, record.audit.head()), round_record,
                    unit.ledger)
      if canary_audit is not None:
        canary_audit.committed()
      rounds_this_call += 1
      if bar is not None:
        bar.set_postfix(round_s=f'{round_record["audit"]["round_seconds"]:.1f}')
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  state.global_model_weights.assign_weights_to(keras_model)
  if canary_audit is not None and stop_reason != run_record.STOPPED:
    canary_audit.finish(state.global_model_weights.trainable, unit.ledger, policy)
  return RunResult(run_dir=run_dir, rounds_completed=round_num,
                   stop_reason=run_record.final_stop_reason(stop_reason, unit.ledger),
                   evaluation=run_record.final_evaluation(keras_model, data.test),
                   ledger=unit.ledger, keras_model=keras_model, policy=policy,
                   commit_seconds=dict(record.seconds))


def _progress_bar(total_rounds: int, initial: int):
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total_rounds, initial=initial, unit='round', dynamic_ncols=True)


def _train_round(config, unit, data: _Data, state, sampled, round_num: int, released,
                 keras_model, canary_audit=None) -> tuple[Any, dict[str, Any]]:
  """One round: the sampled clients train, the aggregator releases; (new state, its record)."""
  started = time.monotonic()
  state = state._replace(aggregator=class_aware.with_released_categories(
      state.aggregator, unit.aggregated(released)))
  before = state.global_model_weights
  initial = [np.asarray(w) for w in before.trainable]
  outputs = unit.train(data, sampled, initial, round_num)
  inputs = [process_lib.as_sub_update_structs(o.sub_updates) for o in outputs.values()]
  if canary_audit is not None:  # Audit run: the round's sampled canary clients join them.
    inputs += canary_audit.client_inputs(round_num, state.aggregator)
  output = unit.process.next(
      state, process_lib.client_values(inputs, getattr(unit, 'clients_per_block', None)))
  state = output.state
  if canary_audit is not None:
    canary_audit.record(round_num, released, output.metrics, before.trainable,
                        state.global_model_weights.trainable)
  unit.record(state.aggregator, outputs)
  after = state.global_model_weights
  norm = run_record.update_norm(before.trainable, after.trainable)
  unit_metrics, unit_audit = unit.round_outputs(released)
  # metrics.csv may be published: no timing, no exact sample size (both confidential).
  metrics = {'round': round_num, 'update_norm': norm, **unit_metrics}
  audit_record = run_record.round_audit_record(
      round_num, list(outputs), released, norm,
      [np.asarray(w) for w in list(after.trainable) + list(after.non_trainable)],
      round_seconds=time.monotonic() - started, **unit_audit)
  if round_num % config.eval_every == 0 or round_num == config.total_rounds:
    after.assign_weights_to(keras_model)
    run_record.evaluate_into(metrics, keras_model, data.test)
  return state, {'round': round_num, 'audit': audit_record, 'metrics': metrics}


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
  audit_run = canaries.is_audit_run(result.run_dir)
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
  if not audit_run:
    saved_model.export_saved_model(result.keras_model, export_dir, result.policy, ledger_json,
                                   model_card_extra=card)
  written = saved_model.write_model_card(
      os.path.join(result.run_dir, MODEL_CARD_FILE), result.policy, ledger_json,
      model_sha256=audit_lib.model_weights_sha256(result.keras_model.get_weights()), **card)
  if audit_run:
    # Its model carries the canaries: a card that says so, and no SavedModel to deploy.
    canaries.write_audit_model_card(result.run_dir, written)
    return None
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
