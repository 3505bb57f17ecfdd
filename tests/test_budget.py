"""The budget core both ledgers share (privacy/budget.py): history, epsilon, freezing, restore."""

import dp_accounting
import pytest

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import budget
from tff_medical.privacy import example_ledger
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy.sampling import SamplingSpec

from helpers import reference_epsilon  # pylint: disable=g-bad-import-order

CATS = categories.CATEGORY_IDS
POLICY = policy_lib.default_policy()
SAMPLING = SamplingSpec('poisson', 1000, 100)


def _budgets(z=2.0, relations=1):
  cache = budget.EpsilonCache(POLICY.delta, accounting.Accountant.RDP)
  return budget.CategoryBudgets(POLICY, SAMPLING, {c: (z,) * relations for c in CATS}, cache)


def _round(z, released=CATS, relations=1):
  return tuple((z,) * relations if c in released else None for c in CATS)


def test_merge_runs_groups_equal_neighbours_and_drops_unreleased():
  assert budget.merge_runs([(2.0, 1), (2.0, 3), (None, 5), (1.5, 2), (2.0, 0), (1.5, 1)]) == (
      (2.0, 4), (1.5, 3))


def test_equal_rounds_merge_only_at_equal_steps_per_round():
  b = _budgets()
  b.append(_round(2.0), 3)
  b.append(_round(2.0), 3)
  b.append(_round(2.0), 4)  # Same multipliers, other steps: a new entry, so rounds stay exact.
  b.append(_round(1.5, released=CATS[:2]), 4)
  assert [entry[1:] for entry in b.history] == [[6, 2], [4, 1], [4, 1]]
  assert (b.rounds, b.steps) == (4, 14)
  assert b.rounds_released(0) == 4 and b.rounds_released(5) == 3
  assert b.steps_released(5) == 10
  assert b.runs(0) == ((2.0, 10), (1.5, 4))
  assert b.noise_multiplier(0) == 1.5 and b.noise_multiplier(5) == 2.0


def test_epsilon_is_dp_accountings_for_the_released_steps():
  b = _budgets()
  for _ in range(3):
    b.append(_round(2.0), 1)
  expected = reference_epsilon([(SAMPLING.rate, 2.0, 3)], POLICY.delta)
  assert b.epsilon(0) == pytest.approx(expected, rel=1e-9)
  assert b.epsilon(0, extra=(2.0, 2)) == pytest.approx(
      reference_epsilon([(SAMPLING.rate, 2.0, 5)], POLICY.delta), rel=1e-9)


def test_earlier_runs_compose_before_this_history():
  cache = budget.EpsilonCache(POLICY.delta, accounting.Accountant.RDP)
  b = budget.CategoryBudgets(POLICY, SAMPLING, {c: (2.0,) for c in CATS}, cache,
                             earlier=lambda c, r: ((2.0, 4),))
  b.append(_round(2.0), 1)
  assert b.epsilon(0) == pytest.approx(
      reference_epsilon([(SAMPLING.rate, 2.0, 5)], POLICY.delta), rel=1e-9)
  assert b.spent(0, with_earlier=False) == pytest.approx(
      reference_epsilon([(SAMPLING.rate, 2.0, 1)], POLICY.delta), rel=1e-9)


def test_a_category_freezes_when_its_next_round_would_exceed_its_budget():
  b = _budgets(z=3.0)
  rounds = 0
  b.update_frozen(rounds, 1)
  while 'HeadCT' not in b.frozen:
    b.append(_round(3.0, released=[c for c in CATS if c not in b.frozen]), 1)
    rounds += 1
    b.update_frozen(rounds, 1)
    assert rounds < 100
  target = POLICY.budget('HeadCT').epsilon
  assert rounds > 1
  assert b.epsilon(0) <= target < b.epsilon(0, extra=(3.0, 1))
  assert b.status('HeadCT') is budget.CategoryStatus.EXHAUSTED
  assert b.status('Hand') is budget.CategoryStatus.ACTIVE
  assert b.frozen['HeadCT'] == rounds


def test_released_after_counts_rounds_past_the_freeze():
  b = _budgets()
  b.append(_round(2.0), 3, 3)
  b.append(_round(2.0, released=CATS[1:]), 2, 2)
  b.append(_round(2.0), 1, 1)
  assert b.released_after(0, 2) == 2  # Round 3 and round 6.
  assert b.released_after(1, 2) == 4


@pytest.mark.parametrize('raw', [[], {'Unknown': 0}, {'HeadCT': 5}, {'HeadCT': True},
                                 {'HeadCT': -1}, {'HeadCT': 1.0}])
def test_restore_frozen_refuses_what_a_ledger_could_not_have_saved(raw):
  with pytest.raises(PolicyError, match=r'saved frozen must map category ids to rounds in 0\.\.4'):
    _budgets().restore_frozen(raw, 4, 'saved')


def test_over_budget_names_the_category():
  b = _budgets(z=0.5)
  assert b.over_budget() is None
  for _ in range(20):
    b.append(_round(0.5), 1)
  category, spent = b.over_budget()
  assert category == CATS[0] and spent > POLICY.budget(category).epsilon


def test_both_ledgers_use_the_one_status_type_and_policy_check():
  assert ledger_lib.CategoryStatus is budget.CategoryStatus
  assert issubclass(ledger_lib.PrivacyLedger, budget.BudgetLedger)
  assert issubclass(example_ledger.ExampleLevelLedger, budget.BudgetLedger)
  with pytest.raises(PolicyError, match='policy must be a PrivacyPolicy'):
    example_ledger.ExampleLevelLedger({}, {}, 1)


def test_example_ledger_state_with_a_frozen_round_past_the_run_is_refused():
  spec = example_ledger.SiteSpec(SamplingSpec('poisson', 500, 50), {c: 2.0 for c in CATS})
  ledger = example_ledger.ExampleLevelLedger(POLICY, {'a': spec}, 2)
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(2.0)), 2)
  ledger.record_round({'a': {c: event for c in ledger.releasable('a')}})
  assert ledger.site_steps_released('a', 'Hand') == 2
  state = ledger.state()
  assert example_ledger.ExampleLevelLedger.from_state(state, POLICY).state() == state
  state['sites']['a']['frozen'] = {'HeadCT': 7}
  with pytest.raises(PolicyError, match=r'frozen must map category ids to rounds in 0\.\.1'):
    example_ledger.ExampleLevelLedger.from_state(state, POLICY)
