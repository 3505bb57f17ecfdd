"""The privacy-utility study: a tiny grid runs, and its table, verdict and plot render."""

from xml.etree import ElementTree

import pytest

from tff_medical import categories
from tff_medical.benchmarks import plot
from tff_medical.benchmarks import privacy_utility
from tff_medical.benchmarks import report

TINY = privacy_utility.StudyPlan(num_per_category=30, num_clients=60, partitions=('iid',),
                                 policy_scales=(4.0, privacy_utility.NO_DP), seeds=(0, 1),
                                 clients_per_round=30, rounds=2, eval_every=2)


@pytest.fixture(scope='module')
def tiny_study():
  return privacy_utility.run_study(TINY, log=lambda message: None)


@pytest.mark.slow  # End-to-end tier: trains the study's four runs.
def test_tiny_study_has_every_run_and_a_consistent_summary(tiny_study):
  result = tiny_study['partitions']['iid']
  assert result['clients'] == 60 and result['test_examples'] == 18
  assert result['train_examples'] == 162
  assert sorted(result['runs']) == ['no_dp', 'x4']
  for key, runs in result['runs'].items():
    assert [r['seed'] for r in runs] == [0, 1]
    accuracies = [r['accuracy'] for r in runs]
    assert result['summary'][key]['all'] == pytest.approx(
        {'mean': sum(accuracies) / 2, 'min': min(accuracies), 'max': max(accuracies)})
    for r in runs:
      assert set(r['per_category']) == set(categories.CATEGORY_IDS)
      assert all(0 <= v <= 1 for v in r['per_category'].values())


def _figure(value):
  return {'mean': value, 'min': value, 'max': value}


def _study(seed_policy_values, no_dp_value):
  summary = {'x1': {'all': _figure(0.9)}, 'no_dp': {'all': {'mean': 0.95, 'min': 0.94,
                                                             'max': 0.96}}}
  for c in categories.CATEGORY_IDS:
    summary['x1'][c] = _figure(seed_policy_values[c])
    summary['no_dp'][c] = _figure(no_dp_value)
  plan = dict(vars(TINY), policy_scales=[1.0, None], seeds=[0, 1])
  return {'plan': plan, 'seconds': 12.0, 'partitions': {'iid': {
      'clients': 60, 'train_examples': 162, 'test_examples': 18, 'images_per_client': 2.7,
      'mean_categories_held': 2.3, 'largest_category_group': 3, 'clip_target': 0.806,
      'runs': {}, 'summary': summary}}}


def test_report_table_and_goal_verdict():
  values = {c: 0.97 for c in categories.CATEGORY_IDS}
  values['ChestCT'] = 0.90
  lines = report._privacy_utility(_study(values, 1.0), 'plot.svg')  # pylint: disable=protected-access
  page = '\n'.join(lines)
  assert '| **x1 (seed)** | 0.5 / 1 / 2 | 90.0 | 97 | 97 | 97 | 90 | 97 | 97 |' in page
  assert '| no DP | - | 95.0 (94.0-96.0) | 100 | 100 | 100 | 100 | 100 | 100 |' in page
  assert 'beyond 5 points of non-private training: Chest CT (-10.0)' in page
  assert '![accuracy against the policy scale](plot.svg)' in page
  within = report._privacy_utility(  # pylint: disable=protected-access
      _study({c: 0.97 for c in categories.CATEGORY_IDS}, 1.0), None)
  assert any('every category is within 5 points' in line for line in within)


def test_plot_draws_a_marker_per_value_zeros_included():
  values = {c: 0.5 for c in categories.CATEGORY_IDS}
  values['AbdomenCT'] = 0.0
  svg = plot.privacy_utility_svg(_study(values, 1.0))
  root = ElementTree.fromstring(svg)
  circles = [e for e in root.iter() if e.tag.endswith('circle')]
  series = categories.NUM_CATEGORIES + 1
  assert len(circles) == series * 2 + series  # Two x positions a series, plus the legend.
  labels = [e.text for e in root.iter() if e.tag.endswith('text')]
  assert 'x1' in labels and 'no DP' in labels
