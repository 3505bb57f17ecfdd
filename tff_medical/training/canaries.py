"""Canary clients of the empirical privacy audit (config.audit): insertion and statistics.

Per category, canary clients whose only sub-update is a fixed random direction above the clip,
sampled like clients; their cosines with each category's released sub-aggregate and with the
model's deltas. Method and choices: docs/PRIVACY_AUDIT.md.
"""

import collections
import dataclasses
import io
import json
import os
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow_federated as tff

from tff_medical import categories
from tff_medical import fileio
from tff_medical import run_files
from tff_medical.aggregation import class_aware
from tff_medical.errors import ConfigError
from tff_medical.privacy import empirical_audit

STATE_FILE = run_files.AUDIT_CANARIES_FILE  # Confidential (run_files): canary statistics.
MEASUREMENT = 'audit_sub_aggregate'
# Stream tags apart from the sampler's (seed, round) streams.
_DIRECTIONS_TAG = 0xCA7A
_SAMPLE_TAG = 0xCA7B


def enabled(config) -> bool:
  audit = config.get('audit')
  return bool(audit is not None and audit.get('enabled', False))


class TapFactory(tff.aggregators.UnweightedAggregationFactory):
  """The inner aggregation, its result also reported as a measurement (for the audit only).

  State and result are the inner process's own, so the DP events and clip norms read from the
  state are those of the inner mechanism.
  """

  def __init__(self, inner: tff.aggregators.UnweightedAggregationFactory):
    self._inner = inner

  def create(self, value_type) -> tff.templates.AggregationProcess:
    process = self._inner.create(value_type)

    @tff.federated_computation(process.initialize.type_signature.result,
                               tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      output = process.next(state, value)
      measurements = tff.federated_zip(collections.OrderedDict(
          [('inner', output.measurements), (MEASUREMENT, output.result)]))
      return tff.templates.MeasuredProcessOutput(output.state, output.result, measurements)

    return tff.templates.AggregationProcess(process.initialize, next_fn)


def tapped_factory(factory: class_aware.ClassAwareFactory) -> class_aware.ClassAwareFactory:
  """The same per-category mechanisms, each sub-aggregate also reported for the audit."""
  # pylint: disable=protected-access
  inner = factory._factories
  weights = dict(zip(categories.CATEGORY_IDS, map(float, factory._weights)))
  # pylint: enable=protected-access
  return class_aware.ClassAwareFactory(
      collections.OrderedDict((c, TapFactory(inner[c])) for c in categories.CATEGORY_IDS),
      weights, is_dp=factory.is_dp)


def sub_aggregates(metrics: Any) -> dict[str, list[np.ndarray]]:
  """Each category's tapped sub-aggregate from a learning process output's metrics."""
  aggregator = metrics['aggregator']
  return {c: [np.asarray(t) for t in _leaves(aggregator[c][MEASUREMENT])]
          for c in categories.CATEGORY_IDS}


def _leaves(value):
  if isinstance(value, Mapping):
    for v in value.values():
      yield from _leaves(v)
  elif isinstance(value, (list, tuple)) or hasattr(value, '_fields'):
    for v in value:
      yield from _leaves(v)
  else:
    yield value


def _flat(arrays) -> np.ndarray:
  return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _cosines(directions: np.ndarray, vector: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(vector)
  if norm == 0:
    return np.zeros(directions.shape[0])  # A zero delta says nothing (as the paper's code).
  return (directions @ vector.astype(np.float32)).astype(np.float64) / norm


@dataclasses.dataclass
class _CategoryState:
  max_mech_seen: np.ndarray
  max_mech_unseen: np.ndarray
  sum_mech: np.ndarray
  max_model_seen: np.ndarray
  max_model_unseen: np.ndarray
  rounds: int = 0
  insertions: int = 0


class CanaryAudit:
  """The run's canaries: their insertion each round and the statistics of what was released."""

  def __init__(self, shapes: list[tuple[int, ...]], sampler_seed: int, rate: float, *,
               per_category: int, norm_multiple: float):
    self._shapes = [tuple(s) for s in shapes]
    self._sizes = [int(np.prod(s)) for s in self._shapes]
    self.dim = int(sum(self._sizes))
    self._seed = int(sampler_seed)
    self._rate = float(rate)
    self.per_category = int(per_category)
    self.norm_multiple = float(norm_multiple)
    self._seen, self._unseen = {}, {}
    for index, c in enumerate(categories.CATEGORY_IDS):
      rng = np.random.default_rng([self._seed, _DIRECTIONS_TAG, index])
      directions = rng.standard_normal((2 * self.per_category, self.dim), dtype=np.float32)
      directions /= np.linalg.norm(directions, axis=1, keepdims=True)  # float32: 6 x 2k x d.
      self._seen[c], self._unseen[c] = directions[:self.per_category], directions[self.per_category:]
    self.round = 0
    self._initial: Optional[np.ndarray] = None
    self._state = {c: self._empty() for c in categories.CATEGORY_IDS}

  @classmethod
  def for_run(cls, config, run_dir: str, initial_trainable, seed: int, rate: float,
              round_num: int) -> 'CanaryAudit':
    """A run's canaries: new at round 0, else its statistics so far from run_dir."""
    audit = cls([np.shape(w) for w in initial_trainable], seed, rate,
                per_category=config.audit.canaries_per_category,
                norm_multiple=config.audit.canary_norm_multiple)
    if round_num:
      audit.load(run_dir, round_num)
    else:
      audit.start(initial_trainable)
    return audit

  def _empty(self) -> _CategoryState:
    k = self.per_category
    return _CategoryState(np.full(k, -np.inf), np.full(k, -np.inf), np.zeros(self.dim),
                          np.full(k, -np.inf), np.full(k, -np.inf))

  def sampled(self, round_num: int) -> dict[str, np.ndarray]:
    """The inserted canaries each category's sample holds in `round_num` (Poisson, rate q)."""
    rng = np.random.default_rng([self._seed, _SAMPLE_TAG, int(round_num)])
    draws = rng.random((categories.NUM_CATEGORIES, self.per_category)) < self._rate
    return {c: np.flatnonzero(draws[i]) for i, c in enumerate(categories.CATEGORY_IDS)}

  def vectors(self, category_id: str, canaries_: np.ndarray, clip_norm: float) -> np.ndarray:
    """Inserted canaries `canaries_` of `category_id`, flat, each norm_multiple x clip_norm."""
    return self._seen[category_id][np.asarray(canaries_, np.int64)] * np.float32(
        self.norm_multiple * float(clip_norm))

  def sub_updates(self, category_id: str, canary: int, clip_norm: float) -> list[list[np.ndarray]]:
    """Canary `canary` of `category_id`: LocalTrainer's [category][variable] sub-update layout."""
    vector = self._seen[category_id][canary].astype(np.float64) * (
        self.norm_multiple * float(clip_norm))
    pieces, start = [], 0
    for shape, size in zip(self._shapes, self._sizes):
      pieces.append(vector[start:start + size].reshape(shape).astype(np.float32))
      start += size
    return [pieces if c == category_id else [np.zeros(s, np.float32) for s in self._shapes]
            for c in categories.CATEGORY_IDS]

  def start(self, initial_trainable) -> None:
    if self._initial is None:
      self._initial = _flat(initial_trainable)

  def record_round(self, round_num: int, released, sampled: Mapping[str, np.ndarray],
                   sub_aggregates: Mapping[str, list[np.ndarray]], model_delta) -> None:
    """One released round: the cosines of every canary with what it released."""
    delta = -_flat(model_delta)
    for c in categories.CATEGORY_IDS:
      state = self._state[c]
      np.maximum(state.max_model_seen, _cosines(self._seen[c], delta), out=state.max_model_seen)
      np.maximum(state.max_model_unseen, _cosines(self._unseen[c], delta),
                 out=state.max_model_unseen)
      if c not in released:
        continue  # Frozen: its sub-aggregate was not released (multiplied by zero).
      aggregate = _flat(sub_aggregates[c])
      state.sum_mech += aggregate
      np.maximum(state.max_mech_seen, _cosines(self._seen[c], aggregate), out=state.max_mech_seen)
      np.maximum(state.max_mech_unseen, _cosines(self._unseen[c], aggregate),
                 out=state.max_mech_unseen)
      state.rounds += 1
      state.insertions += int(len(sampled.get(c, ())))
    self.round = int(round_num)

  def statistics(self, final_trainable) -> dict[str, dict[str, empirical_audit.CategoryStatistics]]:
    """Per category: the mechanism's and the released model's canary statistics."""
    total = -(_flat(final_trainable) - self._initial)
    out = {}
    for c in categories.CATEGORY_IDS:
      state = self._state[c]
      out[c] = {
          'mechanism': empirical_audit.CategoryStatistics(
              _cosines(self._seen[c], state.sum_mech), state.max_mech_seen,
              state.max_mech_unseen, self.dim, state.rounds, state.insertions),
          'released_model': empirical_audit.CategoryStatistics(
              _cosines(self._seen[c], total), state.max_model_seen, state.max_model_unseen,
              self.dim, self.round, state.insertions),
      }
    return out

  # Resume: the statistics so far, saved after each round's checkpoint (owner-only).
  def save(self, run_dir: str) -> None:
    arrays = {'round': np.int64(self.round), 'initial': self._initial}
    for c in categories.CATEGORY_IDS:
      for field, value in dataclasses.asdict(self._state[c]).items():
        arrays[f'{c}/{field}'] = np.asarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fileio.write_atomic(os.path.join(run_dir, STATE_FILE), buffer.getvalue(), mode=0o600)

  def load(self, run_dir: str, round_num: int) -> None:
    """The statistics up to `round_num` (the checkpoint resumed from), or a clear refusal."""
    path = os.path.join(run_dir, STATE_FILE)
    try:
      with np.load(path) as data:
        saved_round = int(data['round'])
        if saved_round == round_num:
          self.round = saved_round
          self._initial = np.asarray(data['initial'])
          for c in categories.CATEGORY_IDS:
            fields = {f.name: data[f'{c}/{f.name}'] for f in dataclasses.fields(_CategoryState)}
            self._state[c] = _CategoryState(**{
                k: (int(v) if k in ('rounds', 'insertions') else np.array(v))
                for k, v in fields.items()})
          return
    except (OSError, KeyError, ValueError):
      saved_round = None
    raise ConfigError(
        f'Cannot resume the audit run in {run_dir}: its canary statistics '
        f'({STATE_FILE}) are {"missing or unreadable" if saved_round is None else "of round " + str(saved_round)}, '
        f'not of round {round_num} (the checkpoint). Start a new audit run with a new '
        '--experiment_name.')


def audit_report(audit: CanaryAudit, final_trainable, ledger, policy, *, confidence: float,
                 bootstrap: int, seed: int = 0) -> dict[str, Any]:
  """The content of empirical_audit.json."""
  stats = audit.statistics(final_trainable)
  report = {'method': 'one-shot empirical privacy estimation (Andrew et al., ICLR 2024), '
                      'per category',
            'delta': policy.delta, 'rounds': audit.round, 'dim': audit.dim,
            'canaries_per_category': audit.per_category,
            'canary_norm_multiple': audit.norm_multiple, 'confidence': confidence,
            'bootstrap': bootstrap, 'categories': {}}
  for index, c in enumerate(categories.CATEGORY_IDS):
    claimed = float(ledger.epsilon_this_run(c)) if ledger is not None else None
    entry = {'claimed_epsilon': claimed,
             'budget_epsilon': float(policy.budget(c).epsilon)}
    for view in ('mechanism', 'released_model'):
      entry[view] = empirical_audit.category_report(
          stats[c][view], claimed, policy.delta, confidence=confidence, bootstrap=bootstrap,
          seed=seed + 10 * index + (0 if view == 'mechanism' else 5))
    if claimed is not None:
      entry['empirical_epsilon_upper'] = entry['mechanism']['all_iterates']['interval'][1]
      entry['passed'] = bool(entry['mechanism']['passed'] and entry['released_model']['passed'])
    report['categories'][c] = entry
  report['passed'] = all(e.get('passed', False) for e in report['categories'].values())
  return report


class ProgramAudit:
  """What the training program calls in an audit run (config.audit.enabled); see program.py."""

  def __init__(self, config, run_dir: str, sampler, initial_trainable, round_num: int):
    self._config = config
    self._run_dir = run_dir
    self.canaries = CanaryAudit.for_run(config, run_dir, initial_trainable, sampler.seed,
                                        sampler.rate, round_num)
    self._sampled: dict[str, np.ndarray] = {}

  @classmethod
  def maybe(cls, config, run_dir: str, sampler, initial_trainable,
            round_num: int) -> Optional['ProgramAudit']:
    """The run's audit, or None when config.audit is off."""
    if not enabled(config):
      return None
    return cls(config, run_dir, sampler, [np.asarray(w) for w in initial_trainable], round_num)

  def client_inputs(self, round_num: int, aggregator_state) -> list[collections.OrderedDict]:
    """The round's sampled canaries as client inputs of the class-aware aggregator."""
    norms = class_aware.clip_norms(aggregator_state)
    self._sampled = self.canaries.sampled(round_num)
    inputs = []
    for c in categories.CATEGORY_IDS:
      for canary in self._sampled[c]:
        sub_updates = self.canaries.sub_updates(c, int(canary), norms[c])
        inputs.append(collections.OrderedDict(
            (cid, sub_updates[i]) for i, cid in enumerate(categories.CATEGORY_IDS)))
    return inputs

  def record(self, round_num: int, released, metrics, before_trainable, after_trainable) -> None:
    """The round's released sub-aggregates and model delta (after the aggregator ran)."""
    delta = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
             for a, b in zip(after_trainable, before_trainable)]
    self.canaries.record_round(round_num, tuple(released), self._sampled,
                               sub_aggregates(metrics), delta)

  def committed(self) -> None:
    """After the round's checkpoint and release: the statistics, and the ledger's audit mark."""
    self.canaries.save(self._run_dir)
    mark_ledger(self._run_dir)

  def finish(self, final_trainable, ledger, policy) -> dict[str, Any]:
    """Writes empirical_audit.json (publishable: no client, no canary direction) and returns it."""
    report = audit_report(self.canaries, [np.asarray(w) for w in final_trainable], ledger, policy,
                          confidence=self._config.audit.confidence,
                          bootstrap=self._config.audit.bootstrap)
    fileio.write_atomic(os.path.join(self._run_dir, run_files.EMPIRICAL_AUDIT_FILE),
                        json.dumps(report, indent=2, allow_nan=False) + '\n')
    return report


AUDIT_RUN_NOTE = ('Audit run: canary clients were inserted to measure the privacy actually '
                  'provided (empirical_audit.json). Its model carries the canaries and is not a '
                  'deployable model.')


def mark_ledger(run_dir: str) -> None:
  """Marks privacy_ledger.json as an audit run's (the ledger itself is written each round)."""
  path = os.path.join(run_dir, run_files.LEDGER_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    ledger_json = json.load(f)
  if ledger_json.get('audit_run') is True:
    return
  ledger_json['audit_run'] = True
  ledger_json['audit_note'] = AUDIT_RUN_NOTE
  fileio.write_atomic(path, json.dumps(ledger_json, indent=2, allow_nan=False) + '\n')


def is_audit_run(run_dir: str) -> bool:
  """Whether the run in `run_dir` was an audit run (its config.json says so)."""
  try:
    with open(os.path.join(run_dir, run_files.CONFIG_FILE)) as f:
      run_config = json.load(f)
  except (OSError, ValueError):
    return False
  return bool(run_config.get('audit_run')) or bool(
      ((run_config.get('config') or {}).get('audit') or {}).get('enabled'))


def model_card_section(run_dir: str) -> dict[str, Any]:
  """The model card's audit section: the run is an audit run; claimed vs empirical epsilon."""
  report = None
  try:
    with open(os.path.join(run_dir, run_files.EMPIRICAL_AUDIT_FILE)) as f:
      report = json.load(f)
  except (OSError, ValueError):
    pass
  section = {'audit_run': True, 'deployable': False, 'note': AUDIT_RUN_NOTE}
  if isinstance(report, dict):
    section['passed'] = report.get('passed')
    section['delta'] = report.get('delta')
    section['categories'] = {
        c: {'claimed_epsilon': e.get('claimed_epsilon'),
            'empirical_epsilon': e.get('mechanism', {}).get('all_iterates', {}).get('epsilon'),
            'empirical_interval': e.get('mechanism', {}).get('all_iterates', {}).get('interval'),
            'passed': e.get('passed')}
        for c, e in report.get('categories', {}).items()}
  return section


def write_audit_model_card(run_dir: str, card: Mapping[str, Any]) -> None:
  """Rewrites model_card.json with the audit section (the card write_model_card produced)."""
  card = dict(card, empirical_audit=model_card_section(run_dir))
  fileio.write_atomic(os.path.join(run_dir, run_files.MODEL_CARD_FILE),
                      json.dumps(card, indent=2, allow_nan=False) + '\n')
