"""The budget core both privacy ledgers share: per category, what was released, its epsilon, and
when the category froze. The client-level and example-level ledgers differ only around it.
"""

import enum
from typing import Any, Callable, Mapping, Optional, Sequence

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy.accounting import Accountant
from tff_medical.privacy.policy import PrivacyPolicy
from tff_medical.privacy.sampling import SamplingSpec

Groups = tuple  # ((multiplier, count[, SamplingSpec]), ...), as accounting.rounds_epsilon reads.


class CategoryStatus(enum.Enum):
  ACTIVE = 'active'
  EXHAUSTED = 'exhausted'


def merge_runs(values: Sequence[tuple[Optional[float], int]]) -> Groups:
  """Merges consecutive equal multipliers into (z, count) groups, dropping unreleased rounds."""
  groups: list[list] = []
  for z, count in values:
    if z is None or count == 0:
      continue
    if groups and groups[-1][0] == z:
      groups[-1][1] += count
    else:
      groups.append([z, count])
  return tuple((z, n) for z, n in groups)


class EpsilonCache:
  """Epsilon of (multiplier, count) groups under a sampling, memoized (accounting is slow)."""

  _LIMIT = 2048

  def __init__(self, delta: float, accountant: Accountant):
    self._delta = delta
    self._accountant = accountant
    self._values: dict[tuple, float] = {}

  def __call__(self, groups: Groups, sampling: SamplingSpec) -> float:
    if not groups:
      return 0.0
    key = (sampling, groups)
    if key not in self._values:
      if len(self._values) >= self._LIMIT:
        self._values.clear()
      self._values[key] = accounting.rounds_epsilon(groups, sampling, self._delta,
                                                    self._accountant)
    return self._values[key]


class BudgetLedger:
  """What every privacy ledger holds: the policy it enforces and the accountant it asks."""

  _accountant: Accountant

  def __init__(self, policy: PrivacyPolicy):
    if not isinstance(policy, PrivacyPolicy):
      raise PolicyError(f'policy must be a PrivacyPolicy. Found {policy!r}.')
    self._policy = policy

  @property
  def policy(self) -> PrivacyPolicy:
    return self._policy

  @property
  def accountant(self) -> Accountant:
    return self._accountant


def _no_earlier(category_id: str, relation: int) -> Groups:
  del category_id, relation
  return ()


class CategoryBudgets:
  """One stream of rounds under one sampling (a run, or one site): its history and budgets.

  A round is a tuple with one entry per category (CATEGORY_IDS order): None if not released,
  else its multipliers, one per neighbouring relation the ledger accounts. Each history entry
  is [round, accountant steps, rounds]; consecutive equal rounds of equal steps are merged.
  """

  def __init__(self,
               policy: PrivacyPolicy,
               sampling: SamplingSpec,
               planned: Mapping[str, Sequence[float]],
               epsilon: EpsilonCache,
               earlier: Callable[[str, int], Groups] = _no_earlier):
    """Starts an empty history.

    Args:
      policy: The budgets.
      sampling: What each accountant step samples (clients of a run, examples of a site).
      planned: Category id -> planned multiplier per relation, predicting a category's next
        round before it has released one.
      epsilon: The ledger's EpsilonCache.
      earlier: (category id, relation index) -> groups spent by earlier runs on the same data,
        composed before this history's.
    """
    self.policy = policy
    self.sampling = sampling
    self.planned = {c: tuple(planned[c]) for c in categories.CATEGORY_IDS}
    self.relations = len(self.planned[categories.CATEGORY_IDS[0]])
    self._epsilon = epsilon
    self._earlier = earlier
    self.history: list[list] = []
    self.frozen: dict[str, int] = {}  # category -> the round count when it was frozen.

  def append(self, round_: tuple, steps: int, rounds: int = 1) -> None:
    last = self.history[-1] if self.history else None
    # Merge only rounds of equal multipliers and equal steps per round, so rounds stay exact.
    if last is not None and last[0] == round_ and last[1] * rounds == steps * last[2]:
      last[1] += steps
      last[2] += rounds
    else:
      self.history.append([round_, steps, rounds])

  @property
  def rounds(self) -> int:
    return sum(r for _, _, r in self.history)

  @property
  def steps(self) -> int:
    return sum(s for _, s, _ in self.history)

  def rounds_released(self, index: int) -> int:
    return sum(r for round_, _, r in self.history if round_[index] is not None)

  def steps_released(self, index: int) -> int:
    return sum(s for round_, s, _ in self.history if round_[index] is not None)

  def released_after(self, index: int, round_num: int) -> int:
    """How many rounds after `round_num` released the category at `index`."""
    released, seen = 0, 0
    for round_, _, rounds in self.history:
      if round_[index] is not None:
        released += max(0, min(rounds, seen + rounds - round_num))
      seen += rounds
    return released

  def runs(self, index: int, relation: int = 0,
           extra: Optional[tuple[float, int]] = None) -> Groups:
    """This history's (multiplier, steps) groups of one category, plus `extra` steps at the end."""
    values = [(None if round_[index] is None else round_[index][relation], steps)
              for round_, steps, _ in self.history]
    if extra is not None:
      values.append(extra)
    return merge_runs(values)

  def last_applied(self, index: int, relation: int = 0) -> Optional[float]:
    for round_, _, _ in reversed(self.history):
      if round_[index] is not None:
        return round_[index][relation]
    return None

  def noise_multiplier(self, index: int, relation: int = 0) -> float:
    """The multiplier last fed to the accountant (the planned one before any)."""
    last = self.last_applied(index, relation)
    return self.planned[categories.CATEGORY_IDS[index]][relation] if last is None else last

  def epsilon(self, index: int, relation: int = 0, extra: Optional[tuple[float, int]] = None,
              with_earlier: bool = True) -> float:
    own = self.runs(index, relation, extra)
    if with_earlier:
      own = self._earlier(categories.CATEGORY_IDS[index], relation) + own
    return self._epsilon(own, self.sampling)

  def spent(self, index: int, with_earlier: bool = True) -> float:
    """The category's guarantee: the larger over the relations."""
    return max(self.epsilon(index, r, with_earlier=with_earlier) for r in range(self.relations))

  def update_frozen(self, now: int, steps_per_round: int) -> None:
    """Freezes, at round count `now`, each category whose next round would exceed its budget.

    The next round is predicted at the smaller of the planned and the last applied multiplier
    (never underestimating a round like the last or the planned one), under every relation.
    """
    for index, c in enumerate(categories.CATEGORY_IDS):
      if c in self.frozen:
        continue
      after = max(self.epsilon(index, r, (self._next_multiplier(index, r), steps_per_round))
                  for r in range(self.relations))
      if after > self.policy.budget(c).epsilon:
        self.frozen[c] = now

  def _next_multiplier(self, index: int, relation: int) -> float:
    last = self.last_applied(index, relation)
    planned = self.planned[categories.CATEGORY_IDS[index]][relation]
    return planned if last is None else min(planned, last)

  def status(self, category_id: str) -> CategoryStatus:
    return CategoryStatus.EXHAUSTED if category_id in self.frozen else CategoryStatus.ACTIVE

  def restore_frozen(self, raw: Any, last_round: int, what: str) -> None:
    """Sets `frozen` from a saved state; PolicyError unless category ids -> rounds 0..last."""
    if (not isinstance(raw, Mapping) or any(c not in categories.CATEGORY_IDS for c in raw) or
        any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= last_round
            for r in raw.values())):
      raise PolicyError(f'{what} frozen must map category ids to rounds in 0..{last_round}. '
                        f'Found {raw!r}.')
    self.frozen = {c: raw[c] for c in categories.CATEGORY_IDS if c in raw}

  def over_budget(self) -> Optional[tuple[str, float]]:
    """The first category spent beyond its budget, with its epsilon; None if none is."""
    for index, c in enumerate(categories.CATEGORY_IDS):
      spent = self.spent(index)
      if spent > self.policy.budget(c).epsilon:
        return c, spent
    return None

