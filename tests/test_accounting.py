"""Tests for tff_medical.privacy.accounting: pinned figures and independent checks."""

import json
import math

import dp_accounting
from dp_accounting import rdp
import numpy as np
import pytest
from scipy import optimize
from scipy import special
from scipy import stats

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy.accounting import Accountant
from tff_medical.privacy.sampling import SamplingMethod
from tff_medical.privacy.sampling import SamplingSpec

DELTA = 1e-5


def poisson(rate, clients_per_round=100):
  return SamplingSpec(SamplingMethod.POISSON, round(clients_per_round / rate), clients_per_round)


# Reference figures of privacy-design.md (dp_accounting 0.4.3, delta 1e-5, Poisson sampling).
@pytest.mark.parametrize('accountant, rate, rounds, target, expected', [
    pytest.param(Accountant.RDP, 0.01, 1000, 2.0, 1.022, id='rdp_q0.01_T1000_eps2'),
    pytest.param(Accountant.PLD, 0.01, 1000, 2.0, 0.959, id='pld_q0.01_T1000_eps2'),
    pytest.param(Accountant.RDP, 0.1, 100, 0.5, 7.87, id='rdp_q0.1_T100_eps0.5'),
    pytest.param(Accountant.RDP, 0.1, 100, 1.0, 4.28, id='rdp_q0.1_T100_eps1'),
    pytest.param(Accountant.RDP, 0.1, 100, 2.0, 2.42, id='rdp_q0.1_T100_eps2'),
])
def test_calibration_reproduces_reference_figures(accountant, rate, rounds, target, expected):
  sampling = poisson(rate)
  z = calibration.calibrate_noise_multiplier(target, DELTA, rounds, sampling, accountant)
  assert z == pytest.approx(expected, abs=0.01)
  if accountant is Accountant.RDP:  # A PLD evaluation at T=1000 takes seconds; one suffices.
    _assert_reaches_target(z, sampling, rounds, target, accountant)
  else:
    assert accounting.epsilon((accounting.round_event(z, sampling), rounds), DELTA,
                              accountant) <= target


def _assert_reaches_target(z, sampling, rounds, target, accountant=Accountant.RDP):
  event = accounting.round_event(z, sampling)
  assert accounting.epsilon((event, rounds), DELTA, accountant) <= target
  # Within 1% of the smallest multiplier that meets the target (the margin is 1e-5).
  smaller = accounting.round_event(z * 0.99, sampling)
  assert accounting.epsilon((smaller, rounds), DELTA, accountant) > target


@pytest.mark.parametrize('sampling, rounds, target', [
    pytest.param(poisson(0.2), 10, 1.0, id='poisson_q0.2'),
    pytest.param(SamplingSpec('fixed_size', 10_000, 100), 200, 1.0, id='fixed_size_q0.01'),
    pytest.param(SamplingSpec('fixed_size', 100, 100), 5, 2.0, id='fixed_size_q1'),
])
def test_calibrated_multiplier_reaches_target_rdp(sampling, rounds, target):
  z = calibration.calibrate_noise_multiplier(target, DELTA, rounds, sampling)
  _assert_reaches_target(z, sampling, rounds, target)


def test_calibration_margin_absorbs_float32_rounding():
  sampling = poisson(0.1)
  z = calibration.calibrate_noise_multiplier(1.0, DELTA, 50, sampling)
  # What TFF reports back after keeping the multiplier in float32.
  z32 = float(np.float32(z) * (1 - 2 * np.finfo(np.float32).eps))
  assert accounting.epsilon((accounting.round_event(z32, sampling), 50), DELTA) <= 1.0


def test_grouped_epsilon_equals_rounds_composed_one_by_one():
  sampling = poisson(0.05)
  event = accounting.round_event(1.3, sampling)
  one_by_one = rdp.RdpAccountant()
  for _ in range(25):
    one_by_one.compose(event)
  assert accounting.epsilon((event, 25), DELTA) == pytest.approx(
      one_by_one.get_epsilon(DELTA), rel=1e-12)


def test_grouped_epsilon_of_changing_events_equals_sequential_composition():
  sampling = poisson(0.05)
  first, second = accounting.round_event(1.3, sampling), accounting.round_event(2.0, sampling)
  sequential = rdp.RdpAccountant()
  for event in [first] * 7 + [second] * 4 + [first] * 3:
    sequential.compose(event)
  grouped = accounting.epsilon([(first, 7), (second, 4), (first, 3)], DELTA)
  assert grouped == pytest.approx(sequential.get_epsilon(DELTA), rel=1e-12)


@pytest.mark.parametrize('sampling, accountant', [
    pytest.param(poisson(0.05), Accountant.RDP, id='poisson_rdp'),
    pytest.param(SamplingSpec('fixed_size', 2000, 100), Accountant.RDP, id='fixed_size_rdp'),
    pytest.param(poisson(0.05), Accountant.PLD, id='poisson_pld'),
])
def test_rounds_epsilon_equals_epsilon_of_rebuilt_events(sampling, accountant):
  groups = [(2.0, 7), (3.0, 4), (2.0, 3)]
  events = [(accounting.round_event(z, sampling), n) for z, n in groups]
  assert accounting.rounds_epsilon(groups, sampling, DELTA, accountant) == pytest.approx(
      accounting.epsilon(events, DELTA, accountant), rel=1e-12)
  assert accounting.rounds_epsilon([], sampling, DELTA, accountant) == 0.0


def _rdp_sampled_gaussian_integer_order(rate, z, order):
  """Mironov, Talwar & Zhang (2019), eq. for integer orders: log A_alpha / (alpha - 1)."""
  k = np.arange(order + 1)
  log_binomial = (special.gammaln(order + 1) - special.gammaln(k + 1) -
                  special.gammaln(order - k + 1))
  terms = (log_binomial + (order - k) * np.log1p(-rate) + k * np.log(rate) +
           (k * k - k) / (2 * z * z))
  return special.logsumexp(terms) / (order - 1)


def _independent_epsilon(rate, z, rounds, delta, improved_conversion):
  best = math.inf
  for order in range(2, 257):
    rdp_value = rounds * _rdp_sampled_gaussian_integer_order(rate, z, order)
    if improved_conversion:  # Canonne, Kamath & Steinke (2020), Prop. 12.
      eps = rdp_value + math.log1p(-1 / order) - (math.log(delta) + math.log(order)) / (order - 1)
    else:  # Mironov (2017), Prop. 3.
      eps = rdp_value + math.log(1 / delta) / (order - 1)
    best = min(best, eps)
  return best


@pytest.mark.parametrize('rate, z, rounds', [
    pytest.param(0.01, 1.0, 1000, id='q0.01_z1_T1000'),
    pytest.param(0.1, 4.28, 100, id='q0.1_z4.28_T100'),
    pytest.param(0.1, 2.42, 100, id='q0.1_z2.42_T100'),
])
def test_rdp_epsilon_matches_independent_sampled_gaussian_bound(rate, z, rounds):
  ours = accounting.epsilon((accounting.round_event(z, poisson(rate)), rounds), DELTA)
  independent = _independent_epsilon(rate, z, rounds, DELTA, improved_conversion=True)
  classic = _independent_epsilon(rate, z, rounds, DELTA, improved_conversion=False)
  # Ours also uses fractional orders, so it may only be lower, and only slightly.
  assert independent * 0.99 <= ours <= independent + 1e-9
  assert ours < classic


def _exact_gaussian_epsilon(sigma, delta):
  """Exact epsilon of the Gaussian mechanism, sensitivity 1 (Balle & Wang 2018, Thm. 8)."""

  def delta_of(eps):
    return (stats.norm.cdf(-eps * sigma + 1 / (2 * sigma)) -
            math.exp(eps) * stats.norm.cdf(-eps * sigma - 1 / (2 * sigma)))

  return optimize.brentq(lambda eps: delta_of(eps) - delta, 0, 100)


def test_pld_matches_exact_gaussian_composition_and_rdp_bounds_it():
  sampling = SamplingSpec('poisson', 100, 100)  # q = 1: no amplification, exact answer known.
  z, rounds = 3.0, 16
  exact = _exact_gaussian_epsilon(z / math.sqrt(rounds), DELTA)
  event = accounting.round_event(z, sampling)
  pld_eps = accounting.epsilon((event, rounds), DELTA, Accountant.PLD)
  rdp_eps = accounting.epsilon((event, rounds), DELTA, Accountant.RDP)
  assert exact - 1e-6 <= pld_eps <= exact + 0.005
  assert rdp_eps >= exact


def test_pld_is_tighter_than_rdp_for_sampled_gaussian():
  event = accounting.round_event(1.0, poisson(0.01))
  pld_eps = accounting.epsilon((event, 200), DELTA, Accountant.PLD)
  rdp_eps = accounting.epsilon((event, 200), DELTA, Accountant.RDP)
  assert 0.5 * rdp_eps < pld_eps < rdp_eps


def test_fixed_size_round_event_halves_the_multiplier_under_replace_one():
  sampling = SamplingSpec('fixed_size', 1000, 50)
  event = accounting.round_event(2.0, sampling)
  assert event == dp_accounting.SampledWithoutReplacementDpEvent(
      1000, 50, dp_accounting.GaussianDpEvent(1.0))
  # Replace-one moves a clipped sum by 2C: with everyone sampled it is the Gaussian at z / 2.
  everyone = accounting.round_event(2.0, SamplingSpec('fixed_size', 50, 50))
  assert accounting.epsilon((everyone, 4), DELTA) >= _exact_gaussian_epsilon(1.0 / 2, DELTA)
  # Replace-one is the stronger relation: never cheaper than Poisson at the same rate.
  assert accounting.epsilon((event, 100), DELTA) > accounting.epsilon(
      (accounting.round_event(2.0, SamplingSpec('poisson', 1000, 50)), 100), DELTA)


def test_round_event_collapses_composed_gaussians():
  composed = dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(2.0),
      dp_accounting.NoOpDpEvent(),
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(4.0), 4),
  ])
  expected_z = (2.0**-2 + 4 * 4.0**-2)**-0.5
  assert accounting.effective_noise_multiplier(composed) == pytest.approx(expected_z)
  event = accounting.round_event(composed, poisson(0.1))
  assert event.event == dp_accounting.GaussianDpEvent(pytest.approx(expected_z))
  # dp_accounting's RDP accountant collapses Gaussians inside a sampled event by the same rule
  # (it rejects the NoOp there, so compare without it).
  raw = dp_accounting.PoissonSampledDpEvent(
      0.1, dp_accounting.ComposedDpEvent([composed.events[0], composed.events[2]]))
  assert accounting.epsilon(event, DELTA) == pytest.approx(accounting.epsilon(raw, DELTA))
  assert accounting.round_event(dp_accounting.NoOpDpEvent(), poisson(0.1)) == (
      dp_accounting.NoOpDpEvent())


def test_numpy_float32_multipliers_are_fully_accounted():
  # TFF reports multipliers as numpy float32. dp_accounting 0.4.3's RDP accountant then drops
  # every Gaussian after the first inside a sampled ComposedDpEvent (its collapse checks
  # isinstance(sigma, float)), understating epsilon. Our collapse must not.
  value, count = dp_accounting.GaussianDpEvent(np.float32(2.0)), dp_accounting.GaussianDpEvent(2.0)
  tff_like = dp_accounting.ComposedDpEvent([value, count])
  correct = accounting.epsilon(
      dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(2.0**0.5)), DELTA)
  ours = accounting.epsilon(accounting.round_event(tff_like, poisson(0.1)), DELTA)
  assert ours == pytest.approx(correct, rel=1e-9)
  pitfall = accounting.epsilon(dp_accounting.PoissonSampledDpEvent(0.1, tff_like), DELTA)
  assert pitfall < 0.6 * correct  # The premise: passing TFF's event raw would under-account.


@pytest.mark.parametrize('event', [
    pytest.param(dp_accounting.LaplaceDpEvent(1.0), id='laplace'),
    pytest.param(dp_accounting.NonPrivateDpEvent(), id='non_private'),
    pytest.param(dp_accounting.GaussianDpEvent(0.0), id='zero_noise'),
    pytest.param(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)),
                 id='already_sampled'),
])
def test_round_event_refuses_what_is_not_a_gaussian_composition(event):
  with pytest.raises(PolicyError, match='must be'):
    accounting.round_event(event, poisson(0.1))


def test_pld_with_fixed_size_sampling_is_refused():
  fixed = SamplingSpec('fixed_size', 1000, 10)
  # Verify the premise: dp_accounting's PLD cannot compose sampling without replacement.
  event = accounting.round_event(1.0, fixed)
  pld_accountant = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
  assert not pld_accountant.supports(event)
  with pytest.raises(PolicyError, match='accountant must be rdp for fixed_size sampling'):
    calibration.calibrate_noise_multiplier(1.0, DELTA, 10, fixed, Accountant.PLD)
  with pytest.raises(PolicyError, match='accountant must be rdp'):
    accounting.epsilon(event, DELTA, Accountant.PLD)
  with pytest.raises(PolicyError, match='accountant must be rdp'):
    accounting.round_event(1.0, fixed, Accountant.PLD)


def test_epsilon_refuses_mixed_sampling_and_bad_input():
  mixed = [accounting.round_event(1.0, poisson(0.1)),
           accounting.round_event(1.0, SamplingSpec('fixed_size', 1000, 100))]
  with pytest.raises(PolicyError, match='one sampling method'):
    accounting.epsilon(mixed, DELTA)
  with pytest.raises(PolicyError, match=r'delta must be in \(0, 1\). Found 0.'):
    accounting.epsilon(mixed[0], 0)
  with pytest.raises(PolicyError, match='accountant must be one of rdp, pld'):
    accounting.epsilon(mixed[0], DELTA, 'moments')
  assert accounting.epsilon([], DELTA) == 0.0


@pytest.mark.parametrize('kwargs, message', [
    pytest.param(dict(target_epsilon=-1.0), 'target_epsilon must be positive. Found -1.0.',
                 id='negative_epsilon'),
    pytest.param(dict(delta=1.5), r'delta must be in \(0, 1\). Found 1.5.', id='delta'),
    pytest.param(dict(rounds=0), 'rounds must be a positive integer. Found 0.', id='rounds'),
    pytest.param(dict(sampling='poisson'), 'sampling must be a SamplingSpec', id='sampling'),
])
def test_calibration_validation(kwargs, message):
  args = dict(target_epsilon=1.0, delta=DELTA, rounds=10, sampling=poisson(0.1))
  args.update(kwargs)
  with pytest.raises(PolicyError, match=message):
    calibration.calibrate_noise_multiplier(**args)


def test_calibrate_category_noise_follows_policy_order_and_budgets():
  policy = policy_lib.default_policy()
  sampling = poisson(0.1)
  zs = calibration.calibrate_category_noise(policy, sampling, 30)
  assert tuple(zs) == categories.CATEGORY_IDS
  for c, z in zs.items():
    eps = accounting.epsilon((accounting.round_event(z, sampling), 30), policy.delta)
    assert eps <= policy.budget(c).epsilon
  # Smaller budget, more noise.
  assert zs['HeadCT'] > zs['AbdomenCT'] > zs['CXR']


# Adaptive clipping split (TFF gaussian_adaptive / TF Privacy QuantileAdaptiveClipSumQuery).
# Under the per-category relation the clipped count has sensitivity 1, so its multiplier is s:
# z**-2 = z_v**-2 + s**-2, and TFF (which assumes 0.5, multiplier 2 s) is given
# z_tff = (z_v**-2 + (2 s)**-2)**-0.5.


def test_split_keeps_tff_default_when_inflation_is_small():
  split = calibration.choose_clipped_count_stddev(1.0, 100)
  assert split.clipped_count_stddev == pytest.approx(5.0)  # 0.05 * m.
  assert split.count_noise_multiplier == pytest.approx(5.0)
  assert split.value_noise_multiplier == pytest.approx((1.0 - 5.0**-2)**-0.5)
  assert split.tff_noise_multiplier == pytest.approx((1.0 - 0.75 * 5.0**-2)**-0.5)
  assert split.inflation <= 1.05


def test_split_raises_count_noise_to_keep_inflation_bound():
  split = calibration.choose_clipped_count_stddev(2.5, 100)
  assert split.clipped_count_stddev > 5.0
  # s >= z / sqrt(1 - 1.05**-2) = 3.28 z.
  assert split.clipped_count_stddev == pytest.approx(2.5 / math.sqrt(1 - 1.05**-2), rel=1e-8)
  assert split.inflation == pytest.approx(1.05, rel=1e-8)
  assert split.inflation <= 1.05 * (1 + 1e-12)
  # The composed value and count noise is exactly the effective multiplier.
  total = (split.value_noise_multiplier**-2 + split.count_noise_multiplier**-2)**-0.5
  assert total == pytest.approx(2.5, rel=1e-12)


def test_split_refuses_when_count_would_be_mostly_noise():
  with pytest.raises(PolicyError) as raised:
    calibration.choose_clipped_count_stddev(7.87, 100)
  message = str(raised.value)
  assert 'clipped_count_stddev must be at most 0.1 of the clients per round' in message
  assert 'at least 259 clients per round' in message
  assert 'fewer rounds or a larger epsilon' in message
  assert 'at most 3.049' in message
  # The suggested fixes do work.
  calibration.choose_clipped_count_stddev(7.87, 259)
  calibration.choose_clipped_count_stddev(3.04, 100)


@pytest.mark.parametrize('args, message', [
    pytest.param((-1.0, 100), 'noise_multiplier must be positive. Found -1.0.', id='z'),
    pytest.param((1.0, 0), 'expected_clients_per_round must be positive. Found 0.', id='m'),
    pytest.param((1.0, 100, 1.0), 'max_value_noise_inflation must be greater than 1. Found 1.0.',
                 id='inflation'),
    pytest.param((1.0, 100, 1.05, 0.0), 'max_count_noise_fraction must be positive. Found 0.0.',
                 id='fraction'),
])
def test_split_validation(args, message):
  with pytest.raises(PolicyError, match=message):
    calibration.choose_clipped_count_stddev(*args)


def test_category_splits_cover_all_categories_in_order():
  zs = {c: 1.0 + i for i, c in enumerate(categories.CATEGORY_IDS)}
  splits = calibration.category_splits(zs, 400)
  assert tuple(splits) == categories.CATEGORY_IDS
  for c, split in splits.items():
    assert split.noise_multiplier == zs[c]
    assert split.inflation <= 1.05 * (1 + 1e-12)
    # Both relations' rounds are at least as noisy as the calibrated z, recomputed by hand.
    others = sum((2 * splits[d].clipped_count_stddev)**-2 for d in splits if d != c)
    assert split.other_counts_inverse_square == pytest.approx(others)
    relation_a = (split.value_noise_multiplier**-2 + split.clipped_count_stddev**-2)**-0.5
    relation_b = (split.value_noise_multiplier**-2 +
                  (2 * split.clipped_count_stddev)**-2 + others)**-0.5
    assert min(relation_a, relation_b) == pytest.approx(zs[c], rel=1e-9)
    assert relation_a >= zs[c] * (1 - 1e-12) and relation_b >= zs[c] * (1 - 1e-12)


def test_category_splits_refuse_what_the_whole_client_relation_cannot_carry():
  # Relation (a) alone fits z = 6 at 200 clients a round (count stddev 20 = 0.1 m); with the
  # other five counts moving under relation (b), the value noise would exceed 1.05 z.
  calibration.choose_clipped_count_stddev(6.0, 200)
  zs = {c: 1.0 + i for i, c in enumerate(categories.CATEGORY_IDS)}
  with pytest.raises(PolicyError, match='must leave room for both relations'):
    calibration.category_splits(zs, 200)


def test_split_json_round_trip_and_refusals():
  split = calibration.choose_clipped_count_stddev(2.5, 100)
  payload = json.loads(json.dumps(split.to_json_dict()))
  assert calibration.AdaptiveClipSplit.from_json_dict(payload) == split
  # A plan saved before the per-category fix: count multiplier 2 s, no tff_noise_multiplier.
  old = dict(payload, count_noise_multiplier=2 * split.clipped_count_stddev)
  del old['tff_noise_multiplier']
  with pytest.raises(PolicyError, match=r"missing \['tff_noise_multiplier'\]"):
    calibration.AdaptiveClipSplit.from_json_dict(old)
  with pytest.raises(PolicyError, match='AdaptiveClipSplit.count_noise_multiplier must be'):
    calibration.AdaptiveClipSplit.from_json_dict(
        dict(payload, count_noise_multiplier=2 * split.clipped_count_stddev))
  with pytest.raises(PolicyError, match='count_noise_fraction must be'):
    calibration.AdaptiveClipSplit.from_json_dict(dict(payload, count_noise_fraction=0.5))
  with pytest.raises(PolicyError, match=r"unknown \['extra'\]"):
    calibration.AdaptiveClipSplit.from_json_dict(dict(payload, extra=1))
  with pytest.raises(PolicyError, match='clipped_count_stddev must be more than noise_multiplier'):
    calibration.adaptive_clip_split(2.0, 100, 2.0)


@pytest.mark.parametrize('z, m', [
    pytest.param(1.0, 100, id='default_branch'),
    pytest.param(2.5, 100, id='raised_branch'),
    pytest.param(1.022, 590, id='design_q0.01'),
])
def test_split_agrees_with_tff_and_tf_privacy(z, m):
  # Imported here: TF and TFF take seconds to load and only these tests need them.
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tensorflow_federated.python.aggregators import differential_privacy
  # pylint: enable=g-import-not-at-top

  split = calibration.choose_clipped_count_stddev(z, m)
  # TFF, given tff_noise_multiplier, applies exactly our value multiplier.
  value_z, stddev = differential_privacy.adaptive_clip_noise_params(
      split.tff_noise_multiplier, float(m), split.clipped_count_stddev)
  assert value_z == pytest.approx(split.value_noise_multiplier, rel=1e-12)
  assert stddev == split.clipped_count_stddev
  # ... and value plus count at sensitivity 1 compose to z.
  assert (value_z**-2 + stddev**-2)**-0.5 == pytest.approx(z, rel=1e-12)

  factory = differential_privacy.DifferentiallyPrivateFactory.gaussian_adaptive(
      noise_multiplier=split.tff_noise_multiplier, clients_per_round=float(m),
      clipped_count_stddev=split.clipped_count_stddev)
  query = factory._query._numerator  # NormalizedQuery(QuantileAdaptiveClipSumQuery).
  assert query._noise_multiplier == pytest.approx(split.value_noise_multiplier, rel=1e-12)
  count_query = query._quantile_estimator_query._below_estimate_query._numerator
  assert count_query._stddev == pytest.approx(split.clipped_count_stddev, rel=1e-12)
  assert count_query._l2_norm_clip == 0.5  # TFF's sensitivity: hence its multiplier 2 s.

  # Run one step of the TF Privacy query: its own event says (z_v, 2 s); converted, z.
  state = query.initial_global_state()
  params = query.derive_sample_params(state)
  sample = query.initial_sample_state(tf.zeros(3))
  sample = query.accumulate_record(params, sample, tf.ones(3))
  _, _, event = query.get_noised_result(sample, state)
  gaussians = [float(e.noise_multiplier) for e in event.events]
  assert gaussians == pytest.approx(
      [split.value_noise_multiplier, 2 * split.clipped_count_stddev], rel=1e-6)
  assert accounting.category_event(event).noise_multiplier == pytest.approx(z, rel=1e-6)
  # TFF's event read as is would understate the spend (a larger multiplier than z).
  assert accounting.effective_noise_multiplier(event) > z * (1 + 1e-5)


def test_split_refusal_is_stricter_than_tff():
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_federated.python.aggregators import differential_privacy

  # TFF accepts s = 0.6 z (it needs z < 2 s), but at count sensitivity 1 that is no split.
  differential_privacy.adaptive_clip_noise_params(10.0, 100.0, 6.0)
  with pytest.raises(PolicyError, match=r'clipped_count_stddev must be more than '
                     r'noise_multiplier \(10\): the per-category clipped count has sensitivity 1. '
                     r'Found 6.'):
    calibration.split_noise_multiplier(10.0, 6.0)
  with pytest.raises(PolicyError, match='clipped_count_stddev must be more than'):
    calibration.split_noise_multiplier(10.0, 10.0)
  # Just above our bound, what we pass TFF is within its bound (z_tff < 2 s).
  s = 11.0
  z_tff = calibration.tff_noise_multiplier(10.0, s)
  assert z_tff < 2 * s
  value_z, _ = differential_privacy.adaptive_clip_noise_params(z_tff, 100.0, s)
  assert value_z == pytest.approx(calibration.split_noise_multiplier(10.0, s)[0], rel=1e-9)


@pytest.mark.usefixtures('tff_context')
def test_category_event_converts_a_real_tff_event():
  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff
  from tensorflow_federated.python.aggregators import differential_privacy
  # pylint: enable=g-import-not-at-top

  split = calibration.adaptive_clip_split(2.0, 5.0, 3.0)
  factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
      noise_multiplier=split.tff_noise_multiplier, clients_per_round=5.0,
      clipped_count_stddev=split.clipped_count_stddev)
  process = factory.create(tff.TensorType(np.float32, [2]))
  output = process.next(process.initialize(), [np.ones(2, np.float32)] * 3)
  event = differential_privacy.extract_dp_event_from_state(output.state)
  # The shape category_event relies on: value first, count (2 s) second, float32.
  assert isinstance(event, dp_accounting.ComposedDpEvent) and len(event.events) == 2
  value, count = event.events
  assert isinstance(value.noise_multiplier, np.float32)
  assert float(value.noise_multiplier) == pytest.approx(split.value_noise_multiplier, rel=1e-6)
  assert float(count.noise_multiplier) == pytest.approx(2 * split.clipped_count_stddev, rel=1e-6)
  converted = accounting.category_event(event)
  assert isinstance(converted, dp_accounting.GaussianDpEvent)
  assert converted.noise_multiplier == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize('event', [
    pytest.param(dp_accounting.GaussianDpEvent(1.0), id='single_gaussian'),
    pytest.param(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(1.0)] * 3),
                 id='three_gaussians'),
    pytest.param(dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(1.0), dp_accounting.LaplaceDpEvent(1.0)]), id='laplace'),
    pytest.param(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(1.0)] * 2)), id='sampled'),
    pytest.param(dp_accounting.NoOpDpEvent(), id='noop'),
])
def test_category_event_refuses_other_shapes(event):
  with pytest.raises(PolicyError, match="a category's DP event must be what TFF's "
                     'gaussian_adaptive records'):
    accounting.category_event(event)
  with pytest.raises(PolicyError, match='must be positive'):
    accounting.category_event(dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(1.0), dp_accounting.GaussianDpEvent(0.0)]))


def test_per_category_count_sensitivity_is_one():
  """Removing a client's category-c examples moves its clipped-count record by 1, not 0.5."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tensorflow_federated.python.aggregators import differential_privacy
  # pylint: enable=g-import-not-at-top

  clip, m = 0.1, 4.0
  split = calibration.adaptive_clip_split(2.0, m, 3.0)
  factory = differential_privacy.DifferentiallyPrivateFactory.gaussian_adaptive(
      noise_multiplier=split.tff_noise_multiplier, clients_per_round=m,
      initial_l2_norm_clip=clip, clipped_count_stddev=split.clipped_count_stddev)
  query = factory._query._numerator  # QuantileAdaptiveClipSumQuery.
  params = query.derive_sample_params(query.initial_global_state())

  def sums(records):
    """(clipped value sum, sum of the +-0.5 count records) before noise."""
    sample = query.initial_sample_state(tf.zeros(3))
    for record in records:
      sample = query.accumulate_record(params, sample, tf.constant(record, tf.float32))
    return np.asarray(sample.sum_state), float(sample.quantile_estimator_state)

  big, small = [3.0, 0.0, 4.0], [0.01, 0.0, 0.0]  # Clipped, unclipped.
  others = [big, small]
  with_c = sums([big] + others)  # Client 0 has category-c data.
  without_c = sums([[0.0, 0.0, 0.0]] + others)  # Same client, no c data: a zero sub-update.
  absent = sums(others)  # Client 0 not in the round at all.
  value_move = np.linalg.norm(with_c[0] - without_c[0])
  count_move = abs(with_c[1] - without_c[1])
  assert value_move == pytest.approx(clip, rel=1e-6)  # Sensitivity C, as TFF assumes.
  assert count_move == 1.0  # -0.5 (clipped) -> +0.5 (zero counts as unclipped).
  assert abs(with_c[1] - absent[1]) == 0.5  # Whole-client removal: TFF's 0.5.
  # The Gaussian for these moves at noise (z_v C, s) is the one category_event reports.
  moved = ((value_move / (split.value_noise_multiplier * clip))**2 +
           (count_move / split.clipped_count_stddev)**2)**-0.5
  tff_event = dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(np.float32(split.value_noise_multiplier)),
      dp_accounting.GaussianDpEvent(np.float32(2 * split.clipped_count_stddev))])
  assert accounting.category_event(tff_event).noise_multiplier == pytest.approx(moved, rel=1e-6)
  assert moved == pytest.approx(split.noise_multiplier, rel=1e-6)


def _hockey_stick(p, r, eps, cell):
  return float(np.sum(np.maximum(p - math.exp(eps) * r, 0)) * cell)


@pytest.mark.parametrize('count_stddev_factor', [1.1, 3.28])
def test_accounted_pair_dominates_the_per_category_pair(count_stddev_factor):
  """One round, numerically: the accounted Poisson add/remove Gaussian at z bounds the true pair.

  Normalized by the noise (value z_v C, count s), client k sampled with probability q moves the
  released (value, count) by a = (alpha, r / s) with its c data and by b = (0, 0.5 / s) without
  (a zero sub-update counts as unclipped). Both worlds mix the same N(0) with weight 1 - q, so
  the pair is (1-q) N(0) + q N(a) vs (1-q) N(0) + q N(b). It must be dominated, in both
  directions and at every epsilon, by (1-q) N(0) + q N(1/z) vs N(0): what the ledger accounts.
  TFF's own reading (count multiplier 2 s) is not enough.
  """
  z, q = 1.0, 0.1
  s = count_stddev_factor * z
  z_v = (z**-2 - s**-2)**-0.5
  beta = 0.5 / s
  z_tff_event = (z_v**-2 + (2 * s)**-2)**-0.5  # What TFF's event reads as, composed as is.
  xs = np.linspace(-10, 10, 1001)
  cell = (xs[1] - xs[0])**2

  def normal(mean):  # Density of N(mean, I) on the grid (rows: count, columns: value).
    return np.outer(stats.norm.pdf(xs - mean[1]), stats.norm.pdf(xs - mean[0]))

  def mixture(mean):
    return (1 - q) * normal((0, 0)) + q * normal(mean)

  def delta(p, r, eps):
    return max(_hockey_stick(p, r, eps, cell), _hockey_stick(r, p, eps, cell))

  absent = normal((0, 0))
  accounted, tff_reading = mixture((1 / z, 0)), mixture((1 / z_tff_event, 0))
  without_c = mixture((0, beta))
  # With c data: clipped (value moves by C, record -0.5) or unclipped (record +0.5).
  with_c = [mixture((alpha, record / s))
            for alpha, record in [(1 / z_v, -0.5), (1 / z_v, 0.5), (0.5 / z_v, 0.5)]]
  understated = False
  for eps in [0.0, 0.1, 0.5, 1.0, 2.0]:
    bound = delta(accounted, absent, eps)
    for i, p in enumerate(with_c):
      true = delta(p, without_c, eps)
      assert true <= bound * (1 + 1e-3) + 1e-12, (eps, i, true, bound)
      understated |= true > delta(tff_reading, absent, eps) * 1.01
  assert understated
