"""The empirical privacy audit (issue 18): the statistic, canary clients, and audit runs.

The statistic is checked against independent computations (dp_accounting's Gaussian mechanism,
the paper's unequal-variance formula at equal variances) and on a simulated Gaussian mechanism
whose true epsilon dp_accounting knows; the audit must pass an honest mechanism and fail a
broken one (noise divided by 10 behind the ledger's back, a clip ignored), for the broken
category only.
"""

import math

import dp_accounting
import numpy as np
import pytest

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import empirical_audit
from tff_medical.training import canaries

from helpers import smoke_config  # pylint: disable=g-bad-import-order

DELTA = 1e-5


@pytest.mark.parametrize('shift', [0.05, 0.3, 1.0, 3.0])
def test_gaussian_mechanism_epsilon_matches_two_gaussians_formula(shift):
  # dp_accounting's Gaussian privacy loss and the paper's two-Gaussian formula are independent
  # computations of the same quantity at equal variances.
  assert empirical_audit.gaussian_mechanism_epsilon(shift, DELTA) == pytest.approx(
      empirical_audit.epsilon_two_gaussians(0.0, 1.0, shift, 1.0, DELTA), rel=1e-4, abs=1e-6)


def test_gaussian_mechanism_epsilon_pinned_against_accountant():
  # Noise multiplier z, sensitivity 1: shift 1/z. PLD accounting of one Gaussian round.
  z = 2.0
  accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  accountant.compose(dp_accounting.GaussianDpEvent(z))
  assert empirical_audit.gaussian_mechanism_epsilon(1 / z, DELTA) == pytest.approx(
      accountant.get_epsilon(DELTA), rel=1e-3)
  assert empirical_audit.gaussian_mechanism_epsilon(0.0, DELTA) == 0.0


def test_unequal_variances_exceed_equal():
  # A wider alternative distribution is distinguishable in its tails: epsilon grows.
  equal = empirical_audit.epsilon_two_gaussians(0.0, 1.0, 0.5, 1.0, DELTA)
  assert empirical_audit.epsilon_two_gaussians(0.0, 1.0, 0.5, 1.3, DELTA) > equal


@pytest.mark.parametrize('true_shift', [0.1, 0.25])
def test_estimate_interval_covers_known_mechanism(true_shift):
  rng = np.random.default_rng(3)
  seen = rng.normal(true_shift, 1.0, 3000)
  unseen = rng.normal(0.0, 1.0, 3000)
  result = empirical_audit.estimate(seen, DELTA, unseen=unseen, bootstrap=200, seed=1)
  truth = empirical_audit.gaussian_mechanism_epsilon(true_shift, DELTA)
  low, high = result.interval
  assert low <= truth <= high
  assert low <= result.epsilon <= high
  assert result.null_source == 'unseen_canaries'


def test_estimate_without_signal_stays_small():
  rng = np.random.default_rng(4)
  result = empirical_audit.estimate(rng.normal(size=3000), DELTA, unseen=rng.normal(size=3000),
                                    bootstrap=200)
  # |shift| upper end about 2 x 1.96 x sqrt(2 / 3000) at most: epsilon below 0.5.
  assert result.interval[1] < 0.5


def test_estimate_with_closed_form_null():
  dim = 4000
  rng = np.random.default_rng(0)
  # Cosines of unit canaries with a vector they moved by 0.5 null stddevs.
  seen = rng.normal(0.5 / math.sqrt(dim), 1 / math.sqrt(dim), 2000)
  result = empirical_audit.estimate(seen, DELTA, dim=dim, bootstrap=100)
  assert result.shift == pytest.approx(0.5, abs=0.08)
  assert result.interval[0] <= empirical_audit.gaussian_mechanism_epsilon(0.5, DELTA) <= (
      result.interval[1])


@pytest.mark.parametrize('kwargs, message', [
    (dict(seen=[0.1] * 5, unseen=[0.0] * 20), 'seen must hold at least 10'),
    (dict(seen=[0.1] * 20), 'exactly one null'),
    (dict(seen=[0.1] * 20, unseen=[0.0] * 20, dim=10), 'exactly one null'),
    (dict(seen=[math.nan] * 20, dim=10), '1 not finite|20 not finite'),
    (dict(seen=[0.1] * 20, dim=10, bootstrap=3), 'bootstrap must be'),
])
def test_estimate_refuses_bad_input(kwargs, message):
  seen = kwargs.pop('seen')
  with pytest.raises(PolicyError, match=message):
    empirical_audit.estimate(seen, DELTA, **kwargs)


# A simulated per-category Gaussian mechanism (numpy, no TFF): each round, each category's
# sub-aggregate is the clipped sum of its sampled canaries plus N(0, (z_c C)^2) per coordinate,
# over m; the ledger's claim is dp_accounting's epsilon of T Poisson-subsampled Gaussian rounds.
_DIM = 400
_ROUNDS = 30
_RATE = 0.1
_CLIENTS = 50.0
_Z = {'HeadCT': 1.0, 'BreastMRI': 1.0, 'AbdomenCT': 0.8, 'ChestCT': 0.8, 'CXR': 0.7, 'Hand': 0.7}


def _claimed(z):
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(
      dp_accounting.PoissonSampledDpEvent(_RATE, dp_accounting.GaussianDpEvent(z)), _ROUNDS)
  return accountant.get_epsilon(DELTA)


def _simulate(noise_divisor=None, clip_ignored=None, per_category=400, seed=0):
  audit = canaries.CanaryAudit([(_DIM // 2,), (_DIM // 2,)], sampler_seed=seed, rate=_RATE,
                               per_category=per_category, norm_multiple=4.0)
  rng = np.random.default_rng(seed + 100)
  weights = np.zeros(_DIM)
  audit.start([weights[:_DIM // 2], weights[_DIM // 2:]])
  clip = 1.0
  for round_num in range(1, _ROUNDS + 1):
    sampled = audit.sampled(round_num)
    aggregates = {}
    for i, c in enumerate(categories.CATEGORY_IDS):
      total = np.zeros(_DIM)
      for canary in sampled[c]:
        update = np.concatenate(audit.sub_updates(c, int(canary), clip)[i])
        norm = np.linalg.norm(update)
        if c != clip_ignored:
          update = update * min(1.0, clip / norm)
        total += update
      z = _Z[c] / (10 if c == noise_divisor else 1)
      aggregate = (total + rng.normal(0, z * clip, _DIM)) / _CLIENTS
      aggregates[c] = [aggregate[:_DIM // 2], aggregate[_DIM // 2:]]
    delta = -sum(np.concatenate(a) for a in aggregates.values())  # Server SGD, rate 1.
    weights = weights + delta
    audit.record_round(round_num, categories.CATEGORY_IDS, sampled, aggregates,
                       [delta[:_DIM // 2], delta[_DIM // 2:]])
  stats = audit.statistics([weights[:_DIM // 2], weights[_DIM // 2:]])
  return {c: empirical_audit.category_report(stats[c]['mechanism'], _claimed(_Z[c]), DELTA,
                                             bootstrap=100, seed=7)
          for c in categories.CATEGORY_IDS}


def test_simulated_honest_mechanism_passes_every_category():
  reports = _simulate()
  for c, report in reports.items():
    assert report['passed'], (c, report['all_iterates'], report['claimed_epsilon'])
    assert report['insertions'] > 0


@pytest.mark.parametrize('broken', [dict(noise_divisor='CXR'), dict(clip_ignored='ChestCT')],
                         ids=['noise_over_10', 'clip_ignored'])
def test_simulated_broken_mechanism_fails_only_its_category(broken):
  reports = _simulate(**broken)
  affected = next(iter(broken.values()))
  failing = [c for c, r in reports.items() if not r['passed']]
  assert failing == [affected], {c: (r['all_iterates']['interval'], r['claimed_epsilon'])
                                 for c, r in reports.items()}
  assert reports[affected]['gap'] < 0


def test_canary_sampling_is_poisson_at_the_rate_and_repeatable():
  audit = canaries.CanaryAudit([(10,)], sampler_seed=5, rate=0.2, per_category=500,
                               norm_multiple=2.0)
  counts = [len(audit.sampled(r)['Hand']) for r in range(1, 41)]
  # Binomial(500, 0.2): mean 100, sd ~8.9; the mean of 40 rounds within 4 of its sd.
  assert abs(np.mean(counts) - 100) < 4 * 8.9 / math.sqrt(40)
  again = canaries.CanaryAudit([(10,)], sampler_seed=5, rate=0.2, per_category=500,
                               norm_multiple=2.0)
  assert np.array_equal(again.sampled(7)['Hand'], audit.sampled(7)['Hand'])
  other = canaries.CanaryAudit([(10,)], sampler_seed=6, rate=0.2, per_category=500,
                               norm_multiple=2.0)
  assert not np.array_equal(other.sampled(7)['Hand'], audit.sampled(7)['Hand'])


def test_canary_sub_update_is_one_category_above_the_clip():
  audit = canaries.CanaryAudit([(3, 4), (5,)], sampler_seed=1, rate=0.1, per_category=20,
                               norm_multiple=3.0)
  update = audit.sub_updates('CXR', 4, clip_norm=0.5)
  index = categories.LABEL_OF['CXR']
  for i, parts in enumerate(update):
    norm = math.sqrt(sum(float(np.sum(p.astype(np.float64)**2)) for p in parts))
    assert [p.shape for p in parts] == [(3, 4), (5,)]
    assert norm == pytest.approx(1.5 if i == index else 0.0, rel=1e-5)


def test_audit_state_round_trip_and_refusal(tmp_path):
  from tff_medical.errors import ConfigError  # pylint: disable=g-import-not-at-top
  make = lambda: canaries.CanaryAudit([(20,)], sampler_seed=2, rate=0.3, per_category=10,
                                      norm_multiple=2.0)
  audit = make()
  audit.start([np.zeros(20)])
  rng = np.random.default_rng(0)
  aggregates = {c: [rng.normal(size=20)] for c in categories.CATEGORY_IDS}
  audit.record_round(1, categories.CATEGORY_IDS, audit.sampled(1), aggregates, [rng.normal(size=20)])
  audit.save(str(tmp_path))
  assert (tmp_path / canaries.STATE_FILE).stat().st_mode & 0o077 == 0
  resumed = make()
  resumed.load(str(tmp_path), 1)
  final = [rng.normal(size=20)]
  a, b = audit.statistics(final), resumed.statistics(final)
  for c in categories.CATEGORY_IDS:
    np.testing.assert_array_equal(a[c]['mechanism'].max_seen, b[c]['mechanism'].max_seen)
    np.testing.assert_array_equal(a[c]['released_model'].final_seen,
                                  b[c]['released_model'].final_seen)
  with pytest.raises(ConfigError, match='of round 1, not of round 2'):
    make().load(str(tmp_path), 2)


# --- The tap on the real class-aware aggregator (TFF) -------------------------------------------


def _value_type(size):
  import collections  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  update = tff.StructWithPythonType([('w', tff.TensorType(np.float32, [size]))],
                                    collections.OrderedDict)
  return tff.StructWithPythonType([(c, update) for c in categories.CATEGORY_IDS],
                                  collections.OrderedDict)


def _client_values(array):
  import collections  # pylint: disable=g-import-not-at-top
  return [collections.OrderedDict(
      (c, collections.OrderedDict(w=array[k, i].astype(np.float32)))
      for i, c in enumerate(categories.CATEGORY_IDS)) for k in range(array.shape[0])]


@pytest.mark.usefixtures('tff_context')
def test_tap_reports_each_sub_aggregate_and_changes_nothing_else():
  from tff_medical.aggregation import class_aware  # pylint: disable=g-import-not-at-top
  from tff_medical.privacy import calibration  # pylint: disable=g-import-not-at-top
  weights = dict(zip(categories.CATEGORY_IDS, [0.5, 1.0, 2.0, 0.0, 1.5, 3.0]))
  plain = class_aware.ClassAwareFactory.non_private(weights)
  tapped = canaries.tapped_factory(plain)
  updates = np.random.default_rng(0).normal(size=(5, 6, 3))
  plain_process, tapped_process = plain.create(_value_type(3)), tapped.create(_value_type(3))
  plain_out = plain_process.next(plain_process.initialize(), _client_values(updates))
  tapped_out = tapped_process.next(tapped_process.initialize(), _client_values(updates))
  np.testing.assert_allclose(tapped_out.result['w'], plain_out.result['w'], rtol=1e-6)
  metrics = {'aggregator': tapped_out.measurements}
  for i, c in enumerate(categories.CATEGORY_IDS):
    # Each category's own mean, before the combination weights (a frozen or zero-weight
    # category is still measured; the program skips frozen ones).
    np.testing.assert_allclose(canaries.sub_aggregates(metrics)[c][0], updates[:, i].mean(0),
                               rtol=1e-5)
  # DP: the state (DP events, clip norms) is the inner mechanism's, type for type.
  splits = {c: calibration.adaptive_clip_split(2.0, 10, 5.0) for c in categories.CATEGORY_IDS}
  dp = class_aware.ClassAwareFactory.dp(splits)
  assert tapped_state_type(canaries.tapped_factory(dp)).is_equivalent_to(tapped_state_type(dp))


def tapped_state_type(factory):
  return factory.create(_value_type(2)).initialize.type_signature.result


# --- Audit runs of the real program (TFF) -------------------------------------------------------


def _audit_config(**overrides):
  """helpers.smoke_config with a small audit: 3 rounds, 20 canaries a category."""
  return smoke_config(**{'total_rounds': 3, 'eval_every': 3, 'audit.enabled': True,
                         'audit.canaries_per_category': 20, 'audit.bootstrap': 50,
                         **overrides})


def _read_json(path):
  import json  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    return json.load(f)


@pytest.mark.usefixtures('tff_context')
def test_small_audit_run_reports_marks_and_is_not_deployable(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  from tff_medical import run_files  # pylint: disable=g-import-not-at-top
  from tff_medical.training import program  # pylint: disable=g-import-not-at-top
  run_dir = str(tmp_path / 'audit')
  result = program.run(_audit_config(total_rounds=2), run_dir)
  report = _read_json(os.path.join(run_dir, run_files.EMPIRICAL_AUDIT_FILE))
  assert list(report['categories']) == list(categories.CATEGORY_IDS)
  assert report['rounds'] == 2 and report['canaries_per_category'] == 20
  for c, entry in report['categories'].items():
    assert entry['claimed_epsilon'] == pytest.approx(result.ledger.epsilon_this_run(c))
    assert entry['mechanism']['rounds'] == 2
    for view in ('mechanism', 'released_model'):
      estimate = entry[view]['all_iterates']
      assert estimate['null_source'] == 'unseen_canaries'
      assert 0 <= estimate['interval'][0] <= (estimate['interval'][1] or math.inf)
      assert entry[view]['final_model']['null_source'] == 'closed_form'
  assert sum(e['mechanism']['insertions'] for e in report['categories'].values()) > 0
  # Marked as an audit run where the guarantee is shown.
  assert _read_json(os.path.join(run_dir, run_files.CONFIG_FILE))['audit_run'] is True
  assert _read_json(os.path.join(run_dir, run_files.LEDGER_FILE))['audit_run'] is True
  state_file = os.path.join(run_dir, canaries.STATE_FILE)
  assert os.stat(state_file).st_mode & 0o077 == 0
  assert not run_files.is_publishable(canaries.STATE_FILE)
  # Never a deployable model: no SavedModel, a card that says why.
  assert program.export(result) is None
  assert not os.path.exists(os.path.join(run_dir, run_files.SAVED_MODEL_DIR))
  card = _read_json(os.path.join(run_dir, run_files.MODEL_CARD_FILE))
  assert card['empirical_audit']['audit_run'] is True
  assert card['empirical_audit']['deployable'] is False
  assert set(card['empirical_audit']['categories']) == set(categories.CATEGORY_IDS)
  # The dashboard shows claimed against empirical epsilon for the run.
  from tff_medical.monitoring import dashboard  # pylint: disable=g-import-not-at-top
  shown = dashboard.run_data(run_dir, 'audit')['empirical_audit']
  assert shown['categories']['Hand']['claimed_epsilon'] == report['categories']['Hand'][
      'claimed_epsilon']
  page = str(tmp_path / 'dashboard.html')
  dashboard.build_dashboard([run_dir], page)
  with open(page, encoding='utf-8') as f:
    assert '"empirical_audit":{"method"' in f.read()
  from tff_medical.export import release  # pylint: disable=g-import-not-at-top
  with pytest.raises(release.ReleaseError, match='is an audit run'):
    release.assemble(run_dir, str(tmp_path / 'bundle'))
  assert not os.path.exists(tmp_path / 'bundle')


@pytest.mark.slow
@pytest.mark.usefixtures('tff_context')
def test_audit_run_resumes_with_its_canary_statistics(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  from tff_medical import run_files  # pylint: disable=g-import-not-at-top
  from tff_medical.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tff_medical.training import program  # pylint: disable=g-import-not-at-top
  whole_dir, resumed_dir = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  program.run(_audit_config(), whole_dir)
  assert program.run(_audit_config(), resumed_dir, stop_after_rounds=2).rounds_completed == 2
  assert not os.path.exists(os.path.join(resumed_dir, run_files.EMPIRICAL_AUDIT_FILE))
  program.run(_audit_config(), resumed_dir)
  report = _read_json(os.path.join(resumed_dir, run_files.EMPIRICAL_AUDIT_FILE))
  assert all(e['mechanism']['rounds'] == 3 for e in report['categories'].values())
  # A lost canary state cannot be resumed into a report that misses rounds.
  os.remove(os.path.join(resumed_dir, canaries.STATE_FILE))
  with pytest.raises(ConfigError, match='canary statistics'):
    program.run(_audit_config(total_rounds=4), resumed_dir)


@pytest.mark.parametrize('overrides, message', [
    ({'dp': False}, 'audit.enabled needs dp true'),
    ({'sampling': 'fixed_size'}, 'audit.enabled needs sampling'),
    ({'audit.canaries_per_category': 5}, 'at least 10'),
    ({'audit.canary_norm_multiple': 1.0}, 'must be above 1'),
    ({'dp_mechanism': 'shared_noise'}, 'per_category_noise'),
])
def test_audit_config_refused(overrides, message):
  from tff_medical.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tff_medical.training import config as config_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(_audit_config(**overrides))


# Test-only broken mechanisms, injected into one category's TF Privacy query: what the ledger
# reads (the DP event) still claims the calibrated noise.


def _broken_queries(monkeypatch, target, kind):
  import copy  # pylint: disable=g-import-not-at-top
  import tensorflow_privacy as tfp  # pylint: disable=g-import-not-at-top
  from tff_medical.aggregation import class_aware  # pylint: disable=g-import-not-at-top

  class NoiseOverTen(tfp.QuantileAdaptiveClipSumQuery):

    def get_noised_result(self, sample_state, global_state):
      _, _, claimed = super().get_noised_result(sample_state, global_state)
      weak = global_state._replace(sum_state=global_state.sum_state._replace(
          stddev=global_state.sum_state.stddev / 10))
      result, new_state, _ = super().get_noised_result(sample_state, weak)
      return result, new_state, claimed

  class ClipIgnored(tfp.QuantileAdaptiveClipSumQuery):

    def preprocess_record(self, params, record):
      # The norm still feeds the clip's quantile estimate; the record goes through unclipped.
      _, norm = self._sum_query.preprocess_record_impl(params.sum_params, record)
      return self._SampleState(record, self._quantile_estimator_query.preprocess_record(
          params.quantile_estimator_params, norm))

  original = class_aware.category_queries

  def broken(splits, clip=class_aware.AdaptiveClipSettings()):
    queries = dict(original(splits, clip))
    honest = queries[target]
    numerator = copy.copy(honest._numerator)  # pylint: disable=protected-access
    numerator.__class__ = NoiseOverTen if kind == 'noise_over_10' else ClipIgnored
    queries[target] = tfp.NormalizedQuery(numerator,
                                          denominator=honest._denominator)  # pylint: disable=protected-access
    return queries

  monkeypatch.setattr(class_aware, 'category_queries', broken)


def _policy_file(tmp_path, epsilon):
  import json  # pylint: disable=g-import-not-at-top
  from tff_medical.privacy import policy as policy_lib  # pylint: disable=g-import-not-at-top
  raw = _read_json(policy_lib.DEFAULT_POLICY_PATH)
  for entry in raw['categories']:
    entry['epsilon'] = epsilon
  path = tmp_path / 'policy.json'
  path.write_text(json.dumps(raw))
  return str(path)


def _broken_run(tmp_path, monkeypatch, broken):
  import os  # pylint: disable=g-import-not-at-top
  from tff_medical import run_files  # pylint: disable=g-import-not-at-top
  from tff_medical.training import program  # pylint: disable=g-import-not-at-top
  if broken is not None:
    _broken_queries(monkeypatch, *broken)
  # Claims of 4 leave room above this estimator's noise floor at 300 canaries; q T = 2, so most
  # canaries are inserted at least once; a canary at 10 x the clip shows an ignored clip. The
  # model must have many more weights (1,350) than canaries a round, or the other canaries and
  # clients, not the noise, hide each canary.
  config = _audit_config(policy=_policy_file(tmp_path, 4.0), clients_per_round=20,
                         total_rounds=10, eval_every=10, **{
                             'model.conv_filters': (8, 16),
                             'audit.canaries_per_category': 300, 'audit.bootstrap': 100,
                             'audit.canary_norm_multiple': 10.0})
  run_dir = str(tmp_path / 'run')
  program.run(config, run_dir)
  return _read_json(os.path.join(run_dir, run_files.EMPIRICAL_AUDIT_FILE))


@pytest.mark.slow
@pytest.mark.usefixtures('tff_context')
@pytest.mark.parametrize('broken', [None, ('CXR', 'noise_over_10'), ('ChestCT', 'clip_ignored')],
                         ids=['honest', 'noise_over_10', 'clip_ignored'])
def test_program_audit_fails_only_the_broken_category(tmp_path, monkeypatch, broken):
  report = _broken_run(tmp_path, monkeypatch, broken)
  failing = empirical_audit.failing_categories(report)
  summary = {c: (e['claimed_epsilon'], e['mechanism']['all_iterates']['interval'])
             for c, e in report['categories'].items()}
  assert failing == ([] if broken is None else [broken[0]]), summary


@pytest.mark.slow
def test_audit_script_writes_the_page_and_exits_by_the_verdict(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  page = tmp_path / 'PRIVACY_AUDIT.md'
  args = [sys.executable, os.path.join(repo, 'experiments', 'audit.py'),
          '--config=configs/smoke.py', '--config.num_per_category=40',
          '--config.num_clients=100', '--config.clients_per_round=10',
          '--config.total_rounds=2', '--config.model.conv_filters=(4,)',
          '--config.clip.max_count_noise_fraction=1.0', '--config.audit.canaries_per_category=20',
          '--config.audit.bootstrap=50', f'--root_output_dir={tmp_path}', '--experiment_name=a',
          f'--doc={page}']
  done = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=900)
  report = _read_json(tmp_path / 'a' / 'empirical_audit.json')
  assert done.returncode == (0 if report['passed'] else 1), done.stderr[-2000:]
  text = page.read_text()
  assert '- Command: `python ' in text and '- Machine: ' in text and '| Hand |' in text
  # A bad setting is one line, not a traceback, and nothing is written.
  bad = subprocess.run(args[:-2] + ['--experiment_name=b', '--config.sampling=fixed_size'],
                       cwd=repo, capture_output=True, text=True, timeout=900)
  assert bad.returncode != 0 and 'audit.enabled needs sampling' in bad.stderr
  assert 'Traceback' not in bad.stderr
  assert not os.path.exists(tmp_path / 'b' / 'empirical_audit.json')
