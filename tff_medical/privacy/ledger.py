"""The client-level privacy ledger: what each category has spent, round by round.

Per round: `releasable()` before it, `record_round(events)` before anything from it is used or
saved (it checks everything before changing anything). Derivation in docs/PRIVACY.md.
"""

import math
import numbers
from typing import Any, Mapping, Optional, Sequence, Union

import dp_accounting

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import budget
from tff_medical.privacy import ledger_schema as schema
from tff_medical.privacy import shared_noise_calibration
from tff_medical.privacy.accounting import Accountant
from tff_medical.privacy.policy import PrivacyPolicy
from tff_medical.privacy.sampling import SamplingMethod
from tff_medical.privacy.sampling import SamplingSpec
from tff_medical.privacy.shared_noise_calibration import NoiseMechanism

SCHEMA_VERSION = schema.CLIENT_SCHEMA_VERSION
LEDGER_FILENAME = schema.LEDGER_FILENAME
RELATION_STATEMENTS = schema.RELATION_STATEMENTS
CategoryStatus = budget.CategoryStatus


def _finite_positive(field: str, value: Any) -> float:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or
      not math.isfinite(value) or value <= 0):
    raise PolicyError(f'{field} must be positive. Found {value!r}.')
  return float(value)


def _combined(zs: Sequence[Optional[float]],
              mechanism: NoiseMechanism = NoiseMechanism.PER_CATEGORY_NOISE) -> Optional[float]:
  """The one Gaussian equivalent to one round's released categories (None if none)."""
  if mechanism is NoiseMechanism.SHARED_NOISE:
    return shared_noise_calibration.client_noise_multiplier(zs, mechanism)
  released = [z for z in zs if z is not None]
  if not released:
    return None
  # Same rule as accounting.effective_noise_multiplier, on the stored multipliers.
  return accounting.effective_noise_multiplier(
      dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z) for z in released]))


Relation = accounting.Relation
_RELATIONS = tuple(Relation)

def _round_pair(field: str, event: Any,
                sampling: SamplingSpec) -> Optional[tuple[float, float]]:
  """(z under relation (a), z under relation (b)) of one category's round; None if not released.

  A bare GaussianDpEvent is the same round under both relations. Under replace-one (fixed-size
  sampling) relation (b) replaces a category-c-only client by another: every other count keeps
  its record, so (b) is (a).
  """
  if event is None:
    return None
  if isinstance(event, accounting.CategoryRoundEvents):
    parts = tuple(event)
  elif isinstance(event, dp_accounting.DpEvent):
    parts = (event, event)
  else:
    raise PolicyError(f'{field} must be a CategoryRoundEvents, a DpEvent or None. Found {event!r}.')
  zs = []
  for part in parts:
    if not isinstance(part, (dp_accounting.GaussianDpEvent, dp_accounting.NoOpDpEvent)):
      # A composition does not say which part is the clipped count, whose per-category
      # sensitivity differs from what TFF records: only converted events are accepted.
      raise PolicyError(f'{field} must be a GaussianDpEvent (convert TFF\'s event with '
                        f'accounting.category_event). Found {part!r}.')
    try:
      zs.append(accounting.effective_noise_multiplier(part))
    except PolicyError as e:
      raise PolicyError(f'{field}: {e}') from None
  if zs[0] is None:
    return None
  if zs[1] is None or sampling.method is SamplingMethod.FIXED_SIZE:
    zs[1] = zs[0]
  return zs[0], zs[1]


class EarlierRuns:
  """What earlier runs released from the same data (tff_medical.privacy.budget_registry).

  Attributes:
    runs: [(run id, registry entry)], as the registry lists them.
  """

  def __init__(self, runs: Sequence[tuple[str, Mapping[str, Any]]] = ()):
    self.runs = [(run_id, entry) for run_id, entry in runs]
    non_private = [run_id for run_id, entry in self.runs if not entry.get('private', True)]
    if non_private:
      raise PolicyError('earlier runs on this data must all be private to compose a guarantee. '
                        f'Found non-private runs {", ".join(non_private)}.')

  def groups(self, category_id: str, relation: Relation) -> tuple[tuple[float, int, SamplingSpec], ...]:
    found = []
    for _, entry in self.runs:
      spec = SamplingSpec.from_json_dict(entry['sampling'])
      for z, n in (entry.get('spend', {}).get(category_id, {}).get(relation.value) or ()):
        found.append((float(z), int(n), spec))
    return tuple(found)

  def client_groups(self) -> tuple[tuple[float, int, SamplingSpec], ...]:
    found = []
    for _, entry in self.runs:
      spec = SamplingSpec.from_json_dict(entry['sampling'])
      found.extend((float(z), int(n), spec) for z, n in (entry.get('client_level') or ()))
    return tuple(found)

  def events(self, category_id: str, relation: Relation) -> list:
    """[(round DpEvent, count)] for calibration.calibrate_category_noise."""
    return [(accounting.round_event(z, spec), n) for z, n, spec in self.groups(category_id, relation)]

  def to_json(self) -> list[dict[str, Any]]:
    return [dict(entry, run_id=run_id) for run_id, entry in self.runs]


class PrivacyLedger(budget.BudgetLedger):
  """Per-category and client-level epsilon of what was released, with hard budgets.

  Each category is accounted under both relations (accounting.Relation); its epsilon_spent, the
  figure the budget limits, is the larger, over this run and every earlier run on the same data.
  """

  def __init__(self,
               policy: PrivacyPolicy,
               noise_multipliers: Mapping[str, float],
               sampling: SamplingSpec,
               accountant: Union[Accountant, str] = Accountant.RDP,
               noise_mechanism: Union[NoiseMechanism, str] = (
                   NoiseMechanism.PER_CATEGORY_NOISE),
               whole_client_noise_multipliers: Optional[Mapping[str, float]] = None,
               earlier: Optional[EarlierRuns] = None):
    """Starts an empty ledger.

    Args:
      policy: The budgets (epsilon per category, shared delta).
      noise_multipliers: Planned effective multiplier per category (all six) under relation (a),
        used to predict a category's next round before it has released one.
      sampling: How clients are sampled; must be what the sampler in use draws.
      accountant: RDP or PLD (PLD needs Poisson sampling).
      noise_mechanism: How the aggregator noises the categories (per_category_noise or
        shared_noise); decides how they combine into the client-level epsilon.
      whole_client_noise_multipliers: Planned multipliers under relation (b) (the split's
        whole_client_noise_multiplier); default: as under (a).
      earlier: What earlier runs on the same data spent; composed into every figure.
    """
    super().__init__(policy)
    self._sampling = sampling
    self._accountant = accounting.check_sampling_accountant(sampling, accountant)
    self._mechanism = shared_noise_calibration.as_noise_mechanism(noise_mechanism)
    self._earlier = earlier or EarlierRuns()
    planned_a = self._planned_map('noise_multipliers', noise_multipliers)
    planned_b = (planned_a if whole_client_noise_multipliers is None else
                 self._planned_map('whole_client_noise_multipliers',
                                   whole_client_noise_multipliers))
    self._epsilon = budget.EpsilonCache(policy.delta, self._accountant)
    # One accountant step per round; a round holds (z under (a), z under (b)) per category.
    self._budget = budget.CategoryBudgets(
        policy, sampling, {c: (planned_a[c], planned_b[c]) for c in categories.CATEGORY_IDS},
        self._epsilon, lambda c, r: self._earlier.groups(c, _RELATIONS[r]))
    self._spent_by_relation = {c: {r: 0.0 for r in _RELATIONS} for c in categories.CATEGORY_IDS}
    self._spent = {c: 0.0 for c in categories.CATEGORY_IDS}
    self._spent_this_run = {c: 0.0 for c in categories.CATEGORY_IDS}
    self._client_epsilon = 0.0
    self._recompute()
    self._update_frozen()

  @staticmethod
  def _planned_map(field: str, values: Any) -> dict[str, float]:
    if not isinstance(values, Mapping):
      raise PolicyError(f'{field} must be a mapping of category to multiplier. Found {values!r}.')
    unknown = sorted(set(values) - set(categories.CATEGORY_IDS))
    missing = [c for c in categories.CATEGORY_IDS if c not in values]
    if unknown or missing:
      raise PolicyError(f'{field} must have exactly the six categories. Found '
                        f'unknown {unknown} and missing {missing}.')
    return {c: _finite_positive(f'{field}[{c}]', values[c]) for c in categories.CATEGORY_IDS}

  def _client_runs(self):
    return budget.merge_runs([
        (_combined([None if z is None else z[0] for z in round_], self._mechanism), steps)
        for round_, steps, _ in self._budget.history])

  def _update_frozen(self) -> None:
    self._budget.update_frozen(self.rounds_completed, 1)

  def _recompute(self) -> None:
    for index, c in enumerate(categories.CATEGORY_IDS):
      for r, relation in enumerate(_RELATIONS):
        self._spent_by_relation[c][relation] = self._budget.epsilon(index, r)
      self._spent[c] = max(self._spent_by_relation[c].values())
      self._spent_this_run[c] = self._budget.spent(index, with_earlier=False)
    client = self._epsilon(self._earlier.client_groups() + self._client_runs(), self._sampling)
    # The client-level mechanism dominates every category's, but PLD's discretization could
    # invert the two estimates by ~1e-4; raising an upper bound keeps it a valid bound.
    self._client_epsilon = max([client] + list(self._spent.values()))

  # Public API.

  @property
  def sampling(self) -> SamplingSpec:
    return self._sampling

  @property
  def noise_mechanism(self) -> NoiseMechanism:
    return self._mechanism

  @property
  def earlier(self) -> EarlierRuns:
    return self._earlier

  @property
  def rounds_completed(self) -> int:
    return self._budget.rounds

  def releasable(self) -> tuple[str, ...]:
    """Categories whose next round keeps them within budget, in CATEGORY_IDS order.

    The others are frozen ('exhausted'), permanently. The next round is predicted as one more
    round at the smaller of the planned and the last applied multiplier, under each relation.
    """
    self._update_frozen()
    return tuple(c for c in categories.CATEGORY_IDS if c not in self._budget.frozen)

  def status(self, category_id: str) -> CategoryStatus:
    self._policy.budget(category_id)  # Raises PolicyError naming an unknown category.
    return self._budget.status(category_id)

  @property
  def all_exhausted(self) -> bool:
    return len(self._budget.frozen) == len(categories.CATEGORY_IDS)

  def epsilon_spent(self, category_id: str) -> float:
    """The category's guarantee: the larger relation, over every run on the same data."""
    self._policy.budget(category_id)
    return self._spent[category_id]

  def epsilon_by_relation(self, category_id: str) -> dict[str, float]:
    self._policy.budget(category_id)
    return {r.value: e for r, e in self._spent_by_relation[category_id].items()}

  def epsilon_this_run(self, category_id: str) -> float:
    self._policy.budget(category_id)
    return self._spent_this_run[category_id]

  @property
  def client_level_epsilon(self) -> float:
    """Epsilon over all categories together: a client's whole data, not one category's."""
    return self._client_epsilon

  def rounds_released(self, category_id: str) -> int:
    self._policy.budget(category_id)
    return self._budget.rounds_released(categories.LABEL_OF[category_id])

  def noise_multiplier(self, category_id: str, relation: int = 0) -> float:
    """The effective multiplier last fed to the accountant (the planned one before any)."""
    self._policy.budget(category_id)
    return self._budget.noise_multiplier(categories.LABEL_OF[category_id], relation)

  def spend_groups(self) -> dict[str, Any]:
    """This run's spend as the budget registry records it (no earlier runs)."""
    return {
        'spend': {c: {r.value: [list(g) for g in self._budget.runs(index, i)]
                      for i, r in enumerate(_RELATIONS)}
                  for index, c in enumerate(categories.CATEGORY_IDS)},
        'client_level': [list(g) for g in self._client_runs()],
    }

  def record_round(self, events: Mapping[str, Any]) -> None:
    """Records the DP events one round applied, per category (None: not released).

    Args:
      events: Category id -> the round's accounting.CategoryRoundEvents for that category's
        sub-aggregate (class_aware.dp_events), a single GaussianDpEvent (the same under both
        relations), NoOpDpEvent, or None (not released). Missing categories count as None.

    Raises:
      PolicyError: for an unknown category, an event that is not a single Gaussian (a raw TFF
        event must go through accounting.category_event first), an event for an exhausted
        category, or one that would take a category over its budget under either relation.
        Nothing is recorded then: the round must not be released.
    """
    if not isinstance(events, Mapping):
      raise PolicyError(f'events must be a mapping of category id to DpEvent or None. '
                        f'Found {events!r}.')
    unknown = sorted(set(events) - set(categories.CATEGORY_IDS))
    if unknown:
      raise PolicyError(f'events keys must be category ids ({", ".join(categories.CATEGORY_IDS)}'
                        f'). Found {unknown}.')
    round_num = self.rounds_completed + 1
    pairs = [_round_pair(f'events[{c}]', events.get(c), self._sampling)
             for c in categories.CATEGORY_IDS]
    for index, (c, pair) in enumerate(zip(categories.CATEGORY_IDS, pairs)):
      if pair is None:
        continue
      target = self._policy.budget(c).epsilon
      if c in self._budget.frozen:
        raise PolicyError(
            f'events[{c}] must be None in round {round_num}: the category is exhausted (frozen '
            f'after round {self._budget.frozen[c]}, epsilon {self._spent[c]:.6g} of '
            f'{target:g}). Found {events[c]!r}.')
      for r, relation in enumerate(_RELATIONS):
        after = self._budget.epsilon(index, r, (pair[r], 1))
        if after > target:
          raise PolicyError(
              f'events[{c}] must keep epsilon within {target:g} in round {round_num}. Found '
              f'noise multiplier {pair[r]:.6g} ({relation.value}), which would spend '
              f'{after:.6g}.')
    self._budget.append(tuple(pairs), 1)
    self._recompute()
    self._update_frozen()

  def to_json_dict(self) -> dict[str, Any]:
    """The published ledger (privacy_ledger.json); see `validate_ledger_json`."""
    published = {
        'schema_version': SCHEMA_VERSION,
        'accountant': self._accountant.value,
        'privacy_unit': 'client',
        'neighboring_relation': schema.RELATION_NAMES[self._sampling.method],
        'neighboring_relations': dict(RELATION_STATEMENTS[self._sampling.method]),
        'delta': self._policy.delta,
        'sampling': dict(self._sampling.to_json_dict(), rate=self._sampling.rate),
        'rounds_completed': self.rounds_completed,
        'client_level_epsilon': self._client_epsilon,
        'categories': {
            b.id: {
                'display_name': b.display_name,
                'privacy_level': b.privacy_level.value,
                'target_epsilon': b.epsilon,
                'noise_multiplier': self.noise_multiplier(b.id),
                'rounds_released': self.rounds_released(b.id),
                'epsilon_spent': self._spent[b.id],
                'epsilon_this_run': self._spent_this_run[b.id],
                'status': self.status(b.id).value,
                'relations': {
                    r.value: {
                        'epsilon': self._spent_by_relation[b.id][r],
                        'noise_multiplier': self.noise_multiplier(b.id, i),
                        'rounds': [list(g) for g in self._budget.runs(
                            categories.LABEL_OF[b.id], i)],
                    } for i, r in enumerate(_RELATIONS)
                },
            } for b in self._policy.budgets
        },
        'earlier_runs': self._earlier.to_json(),
    }
    if self._mechanism is not NoiseMechanism.PER_CATEGORY_NOISE:
      # Only when not the default: the published shape of per-category ledgers is unchanged.
      published['noise_mechanism'] = self._mechanism.value
    return published

  def state(self) -> dict[str, Any]:
    """JSON-able checkpoint state: the history of applied multipliers, not derived figures.

    Earlier runs are not part of it: they are read from the budget registry at every start,
    so a run resumed after another run on the same data sees that run's spend too.
    """
    return {
        'schema_version': SCHEMA_VERSION,
        'accountant': self._accountant.value,
        'noise_mechanism': self._mechanism.value,
        'sampling': self._sampling.to_json_dict(),
        'policy': self._policy.to_json_dict(),
        'planned_noise_multipliers': {c: p[0] for c, p in self._budget.planned.items()},
        'planned_whole_client_noise_multipliers': {
            c: p[1] for c, p in self._budget.planned.items()},
        'history': [{
            'count': count,
            'noise_multipliers': {c: None if z is None else z[0]
                                  for c, z in zip(categories.CATEGORY_IDS, round_)},
            'whole_client_noise_multipliers': {c: None if z is None else z[1]
                                               for c, z in zip(categories.CATEGORY_IDS, round_)},
        } for round_, _, count in self._budget.history],
        'frozen': dict(self._budget.frozen),
    }

  @classmethod
  def from_state(cls,
                 state: Mapping[str, Any],
                 policy: PrivacyPolicy,
                 sampling: Optional[SamplingSpec] = None,
                 accountant: Optional[Union[Accountant, str]] = None,
                 noise_mechanism: Optional[Union[NoiseMechanism, str]] = None,
                 earlier: Optional[EarlierRuns] = None) -> 'PrivacyLedger':
    """Restores a ledger; refuses one saved under another policy, sampling or accountant.

    Args:
      state: The output of `state()`.
      policy: The policy of the resumed run; must equal the saved one.
      sampling: If given, the resumed run's sampling; must equal the saved one.
      accountant: If given, the resumed run's accountant; must equal the saved one.
      noise_mechanism: If given, the resumed run's noise mechanism; must equal the saved one
        (a state without one was saved by per-category noise).
      earlier: What earlier runs on the same data spent (the budget registry, now).

    Returns:
      A ledger identical to the saved one (history, frozen categories, epsilons).
    """
    if not isinstance(state, Mapping):
      raise PolicyError(f'ledger state must be a mapping. Found {state!r}.')
    if state.get('schema_version') == 1:
      raise PolicyError('ledger state was saved before whole-client removal (relation (b)) was '
                        'accounted, so this run cannot be resumed within its stated guarantee. '
                        'Its released outputs stand; start a new run (a new --experiment_name).')
    if state.get('schema_version') != SCHEMA_VERSION:
      raise PolicyError(f'ledger state schema_version must be {SCHEMA_VERSION}. '
                        f'Found {state.get("schema_version")!r}.')
    if not isinstance(policy, PrivacyPolicy):
      raise PolicyError(f'policy must be a PrivacyPolicy. Found {policy!r}.')
    differences = _policy_differences(state.get('policy'), policy.to_json_dict())
    saved_sampling = SamplingSpec.from_json_dict(state.get('sampling'))
    if sampling is not None:
      differences += [f'sampling.{d}' for d in saved_sampling.differences(sampling)]
    saved_accountant = accounting.as_accountant(state.get('accountant'))
    if accountant is not None and accounting.as_accountant(accountant) is not saved_accountant:
      differences.append(f'accountant: {saved_accountant.value!r} vs '
                         f'{accounting.as_accountant(accountant).value!r}')
    saved_mechanism = shared_noise_calibration.as_noise_mechanism(
        state.get('noise_mechanism', NoiseMechanism.PER_CATEGORY_NOISE.value))
    if (noise_mechanism is not None and
        shared_noise_calibration.as_noise_mechanism(noise_mechanism) is not saved_mechanism):
      differences.append(f'noise_mechanism: {saved_mechanism.value!r} vs '
                         f'{shared_noise_calibration.as_noise_mechanism(noise_mechanism).value!r}')
    if differences:
      raise PolicyError('ledger state must match the resumed run. Found differences (saved vs '
                        f'current): {"; ".join(differences)}.')
    ledger = cls(policy, state.get('planned_noise_multipliers'), saved_sampling, saved_accountant,
                 saved_mechanism, state.get('planned_whole_client_noise_multipliers'), earlier)
    _history_from_state(state.get('history'), ledger._budget)
    ledger._budget.restore_frozen(state.get('frozen'), ledger.rounds_completed, 'ledger state')
    for c, frozen_at in ledger._budget.frozen.items():
      late = ledger._budget.released_after(categories.LABEL_OF[c], frozen_at)
      if late:
        raise PolicyError(f'ledger state history must not release {c} after it was frozen in '
                          f'round {frozen_at}. Found {late} such rounds.')
    over = ledger._budget.over_budget()
    if over:
      raise PolicyError(f'ledger state must keep {over[0]} within its budget '
                        f'{policy.budget(over[0]).epsilon:g}. Found epsilon {over[1]:.6g}.')
    ledger._recompute()
    ledger._update_frozen()
    return ledger

  def save(self, run_dir: str) -> str:
    """Writes privacy_ledger.json in run_dir atomically; returns its path."""
    return schema.write_ledger(run_dir, self.to_json_dict())


def _policy_differences(saved: Any, current: Mapping[str, Any]) -> list[str]:
  if not isinstance(saved, Mapping):
    return [f'policy: {saved!r} vs {current!r}']
  differences = []
  if saved.get('delta') != current['delta']:
    differences.append(f'policy.delta: {saved.get("delta")!r} vs {current["delta"]!r}')
  saved_by_id = {
      e.get('id'): e for e in saved.get('categories', []) if isinstance(e, Mapping)
  }
  for entry in current['categories']:
    old = saved_by_id.get(entry['id'], {})
    for key, value in entry.items():
      if key != 'id' and old.get(key) != value:
        differences.append(f'policy.{entry["id"]}.{key}: {old.get(key)!r} vs {value!r}')
  return differences


def _history_from_state(raw: Any, into: budget.CategoryBudgets) -> None:
  if not isinstance(raw, list):
    raise PolicyError(f'ledger state history must be a list. Found {raw!r}.')
  for entry in raw:
    count = entry.get('count') if isinstance(entry, Mapping) else None
    zs = entry.get('noise_multipliers') if isinstance(entry, Mapping) else None
    whole = entry.get('whole_client_noise_multipliers') if isinstance(entry, Mapping) else None
    if (isinstance(count, bool) or not isinstance(count, int) or count < 1 or
        not isinstance(zs, Mapping) or set(zs) != set(categories.CATEGORY_IDS) or
        not isinstance(whole, Mapping) or set(whole) != set(categories.CATEGORY_IDS) or
        any((zs[c] is None) != (whole[c] is None) for c in categories.CATEGORY_IDS)):
      raise PolicyError('ledger state history entries must have a positive count and, under '
                        'both relations, a multiplier or null for each category. '
                        f'Found {entry!r}.')
    round_ = tuple(
        None if zs[c] is None else
        (_finite_positive(f'history noise_multipliers[{c}]', zs[c]),
         _finite_positive(f'history whole_client_noise_multipliers[{c}]', whole[c]))
        for c in categories.CATEGORY_IDS)
    into.append(round_, count, count)


validate_ledger_json = schema.validate_ledger_json
CATEGORY_KEYS = schema.CATEGORY_KEYS
