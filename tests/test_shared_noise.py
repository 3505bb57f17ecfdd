"""The shared-noise ("Scale") class-aware aggregator: calibration, types, clips, noise, ledger."""

import collections
import json
import math
import os
import re

import dp_accounting
import numpy as np
import pytest
from scipy import stats
import tensorflow_federated as tff

from tff_medical import categories
from tff_medical.aggregation import class_aware
from tff_medical.aggregation import shared_noise
from tff_medical.errors import ConfigError
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import calibration as clip_calibration
from tff_medical.privacy import shared_noise_calibration as calibration
from tff_medical.privacy.sampling import SamplingSpec
from tff_medical.training import config as config_lib

from helpers import reference_epsilon  # pylint: disable=g-bad-import-order
from helpers import smoke_config  # pylint: disable=g-bad-import-order

CATS = categories.CATEGORY_IDS
# Seed-policy-like multipliers (eps 0.5 / 1 / 2 at q = 0.1, 100 rounds; privacy-design.md).
SEED_Z = dict(zip(CATS, [7.87, 7.87, 4.28, 4.28, 2.42, 2.42]))
WEIGHTS = dict(zip(CATS, [0.5, 1.0, 2.0, 1.0, 1.5, 3.0]))


def _value_type(size):
  update = tff.StructWithPythonType([('w', tff.TensorType(np.float32, [size]))],
                                    collections.OrderedDict)
  return tff.StructWithPythonType([(c, update) for c in CATS], collections.OrderedDict)


def _client_values(array):
  """array[k, c, :] -> one struct per client k."""
  return [collections.OrderedDict(
      (c, collections.OrderedDict(w=array[k, i].astype(np.float32))) for i, c in enumerate(CATS))
          for k in range(array.shape[0])]


def _splits(zs=None, m=10.0, **kwargs):
  kwargs.setdefault('max_count_noise_fraction', 10.0)
  return calibration.shared_noise_splits(zs or SEED_Z, m, **kwargs)


def _exact_factory(num_clients, clip_ratios=None, weights=None, initial_clip=1e9,
                   learning_rate=0.0, target=0.5):
  """Zero noise (values and count): the mechanism's arithmetic, visible."""
  return shared_noise.SharedNoiseFactory(
      noise_scale=0.0, clip_ratios=clip_ratios or {c: 1.0 for c in CATS},
      combination_weights=weights or {c: 1.0 for c in CATS}, clipped_count_stddev=0.0,
      expected_clients_per_round=float(num_clients),
      clip=class_aware.AdaptiveClipSettings(initial_clip, target, learning_rate))


# --- Calibration (no TFF) -----------------------------------------------------------------------


def test_splits_share_one_count_stddev_chosen_for_the_largest_multiplier():
  splits = _splits(m=100.0, max_count_noise_fraction=0.5)
  largest = clip_calibration.choose_clipped_count_stddev(7.87, 100.0, max_count_noise_fraction=0.5)
  for c in CATS:
    assert splits[c].clipped_count_stddev == largest.clipped_count_stddev
    s = largest.clipped_count_stddev
    assert splits[c].value_noise_multiplier == pytest.approx(
        (SEED_Z[c]**-2 - s**-2)**-0.5, rel=1e-12)
    assert splits[c].inflation <= 1.05 + 1e-12


def test_calibration_gives_every_category_its_multiplier_under_one_sigma():
  cal = calibration.calibrate_shared_noise(_splits(), WEIGHTS)
  base_clip = 0.37
  sigma = cal.value_noise_stddev(base_clip)
  clips = cal.clip_norms(base_clip)
  value_z = cal.value_noise_multipliers
  # s is the mean of w_c z_v,c (uniform fractions), sigma = s C.
  assert cal.noise_scale == pytest.approx(np.mean([WEIGHTS[c] * value_z[c] for c in CATS]))
  assert sigma == pytest.approx(cal.noise_scale * base_clip)
  for c in CATS:
    # Category c's multiplier: noise / its sensitivity w_c C_c.
    assert sigma / (WEIGHTS[c] * clips[c]) == pytest.approx(value_z[c], rel=1e-12)
    count_s = cal.clipped_count_stddev
    assert (value_z[c]**-2 + count_s**-2)**-0.5 == pytest.approx(SEED_Z[c], rel=1e-12)


def test_client_level_multiplier_is_one_over_sum_of_inverses_and_conservative():
  cal = calibration.calibrate_shared_noise(_splits(), WEIGHTS)
  expected = 1 / sum(1 / SEED_Z[c] for c in CATS)
  assert cal.client_noise_multiplier == pytest.approx(expected, rel=1e-12)
  # The true whole-client mechanism: values move by sum_c w_c C_c, the count by 0.5.
  sigma = cal.value_noise_stddev(1.0)
  value_z = sigma / sum(WEIGHTS[c] * cal.clip_norms(1.0)[c] for c in CATS)
  true_z = (value_z**-2 + (2 * cal.clipped_count_stddev)**-2)**-0.5
  assert cal.client_noise_multiplier <= true_z
  # ... and it is far below the independent-Gaussian composition (which would understate eps).
  independent = sum(z**-2 for z in SEED_Z.values())**-0.5
  assert cal.client_noise_multiplier < independent / 2
  assert calibration.client_noise_multiplier(
      [2.0, None, 4.0], 'per_category_noise') == pytest.approx((2.0**-2 + 4.0**-2)**-0.5)
  assert calibration.client_noise_multiplier([2.0, None, 4.0], 'shared_noise') == pytest.approx(
      1 / (1 / 2.0 + 1 / 4.0))
  assert calibration.client_noise_multiplier([None] * 6, 'shared_noise') is None


@pytest.mark.parametrize('kwargs, message', [
    (dict(splits={c: clip_calibration.adaptive_clip_split(2.0, 10.0, 7.0 + i)
                  for i, c in enumerate(CATS)}),
     'splits must all have the same clipped_count_stddev for shared noise'),
    (dict(splits={c: clip_calibration.adaptive_clip_split(2.0, 10.0 + (c == 'Hand'), 7.0)
                  for c in CATS}),
     'splits must all have the same expected_clients_per_round'),
    (dict(splits={c: s for c, s in _splits().items() if c != 'Hand'}),
     "splits must map each of ['HeadCT', 'BreastMRI', 'AbdomenCT', 'ChestCT', 'CXR', 'Hand']"),
    (dict(combination_weights=dict(WEIGHTS, CXR=0.0)),
     'combination_weights[CXR] must be positive for shared noise (freeze a category to leave '
     'it out). Found 0.0.'),
    (dict(category_fractions={c: 0.0 for c in CATS}),
     'category_fractions must be non-negative with a positive sum'),
], ids=['different_count_stddev', 'different_clients', 'missing_category', 'zero_weight',
        'zero_fractions'])
def test_calibration_refuses_invalid_parameters(kwargs, message):
  args = dict(splits=_splits())
  args.update(kwargs)
  with pytest.raises(PolicyError, match=re.escape(message)):
    calibration.calibrate_shared_noise(**args)


@pytest.mark.parametrize('kwargs, message', [
    (dict(noise_scale=-1.0), 'noise_scale must be a non-negative number. Found -1.0.'),
    (dict(clip_ratios={c: 1.0 for c in CATS[:5]}), 'clip_ratios must map each of'),
    (dict(combination_weights=dict({c: 1.0 for c in CATS}, Hand=0.0)),
     'combination_weights[Hand] must be positive. Found 0.0.'),
    (dict(clipped_count_stddev=float('nan')), 'clipped_count_stddev must be a non-negative'),
    (dict(expected_clients_per_round=0.0), 'expected_clients_per_round must be positive'),
    (dict(clip=0.1), 'clip must be an AdaptiveClipSettings. Found 0.1.'),
], ids=['negative_noise', 'missing_ratio', 'zero_weight', 'nan_count', 'zero_clients',
        'clip_not_settings'])
def test_factory_refuses_invalid_parameters(kwargs, message):
  args = dict(noise_scale=1.0, clip_ratios={c: 1.0 for c in CATS},
              combination_weights={c: 1.0 for c in CATS}, clipped_count_stddev=1.0,
              expected_clients_per_round=10.0)
  args.update(kwargs)
  with pytest.raises(PolicyError, match=re.escape(message)):
    shared_noise.SharedNoiseFactory(**args)


def test_class_aware_shared_noise_constructor_delegates():
  factory = class_aware.ClassAwareFactory.shared_noise(dict(sorted(_splits().items())))
  assert isinstance(factory, shared_noise.SharedNoiseFactory) and factory.is_dp
  with pytest.raises(PolicyError, match='same clipped_count_stddev'):
    class_aware.ClassAwareFactory.shared_noise(
        {c: clip_calibration.adaptive_clip_split(2.0, 10.0, 7.0 + i) for i, c in enumerate(CATS)})


# --- Type signatures (no execution) -------------------------------------------------------------


class TestTypeSignatures:

  def test_process_types(self):
    value_type = _value_type(4)
    process = class_aware.ClassAwareFactory.shared_noise(_splits()).create(value_type)
    state_type = process.initialize.type_signature.result
    assert state_type.placement is tff.SERVER
    assert state_type.member[class_aware.STATE_RELEASED] == tff.TensorType(np.float32, [6])
    next_type = process.next.type_signature
    assert next_type.parameter[0] == state_type
    assert next_type.parameter[1] == tff.FederatedType(value_type, tff.CLIENTS)
    assert next_type.result.state.is_equivalent_to(state_type)
    result = next_type.result.result
    assert result.placement is tff.SERVER
    assert result.member.is_equivalent_to(value_type[CATS[0]])

  def test_works_as_a_weighted_aggregator(self):
    factory = tff.aggregators.as_weighted_aggregator(
        class_aware.ClassAwareFactory.shared_noise(_splits()))
    process = factory.create(_value_type(2), tff.TensorType(np.float32))
    assert process.next.type_signature.result.result.member.is_equivalent_to(
        _value_type(2)[CATS[0]])

  @pytest.mark.parametrize('value_type', [
      tff.TensorType(np.float32, [3]),
      tff.StructWithPythonType([(c, tff.TensorType(np.float32, [3])) for c in CATS[:5]],
                               collections.OrderedDict),
      tff.StructWithPythonType(
          [(c, tff.TensorType(np.float32, [3 if c != 'Hand' else 2])) for c in CATS],
          collections.OrderedDict),
  ], ids=['not_struct', 'five_categories', 'mismatched_sub_update'])
  def test_rejects_wrong_value_types(self, value_type):
    with pytest.raises(TypeError):
      class_aware.ClassAwareFactory.shared_noise(_splits()).create(value_type)


# --- Execution ----------------------------------------------------------------------------------


@pytest.mark.usefixtures('tff_context')
class TestExecution:

  def test_zero_noise_without_clipping_equals_plain_weighted_sum_of_means(self):
    rng = np.random.default_rng(2)
    num_clients = 7
    updates = rng.normal(size=(num_clients, 6, 5))
    process = _exact_factory(num_clients, weights=WEIGHTS).create(_value_type(5))
    output = process.next(process.initialize(), _client_values(updates))
    expected = sum(WEIGHTS[c] * updates[:, i].mean(axis=0) for i, c in enumerate(CATS))
    np.testing.assert_allclose(output.result['w'], expected, rtol=1e-5, atol=1e-6)

  @pytest.mark.parametrize('category', ['HeadCT', 'AbdomenCT', 'Hand'])
  def test_each_category_is_clipped_at_its_own_clip(self, category):
    """A big sub-update in category c contributes exactly w_c C_c in norm, others are intact."""
    cal = calibration.calibrate_shared_noise(_splits(), WEIGHTS)
    base_clip, num_clients, size = 0.5, 3, 4
    index = CATS.index(category)
    updates = np.zeros((num_clients, 6, size))
    updates[0, index] = 100.0 * np.arange(1, size + 1)
    small = (index + 1) % 6  # A sub-update well within its clip passes unchanged.
    updates[1, small] = 1e-3
    process = _exact_factory(num_clients, clip_ratios=cal.clip_ratios, weights=WEIGHTS,
                             initial_clip=base_clip).create(_value_type(size))
    output = process.next(process.initialize(), _client_values(updates))
    total = np.asarray(output.result['w'], np.float64) * num_clients
    clip_c = cal.clip_norms(base_clip)[category]
    expected = (WEIGHTS[category] * clip_c * updates[0, index] / np.linalg.norm(updates[0, index])
                + WEIGHTS[CATS[small]] * updates[1, small])
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    norms = class_aware.clip_norms(output.state)
    for c in CATS:
      assert norms[c] == pytest.approx(cal.clip_norms(base_clip)[c], rel=1e-6)

  @pytest.mark.parametrize('released', [CATS, ('BreastMRI',), ('ChestCT', 'Hand')],
                           ids=['all', 'one', 'two'])
  def test_released_noise_has_stddev_sigma_over_m(self, released):
    """All updates zero: the result is ONE draw of N(0, (s C / m)^2), whatever is released."""
    size, num_clients, m = 20000, 4, 8.0
    splits = _splits(m=m)
    cal = calibration.calibrate_shared_noise(splits, WEIGHTS)
    clip = class_aware.AdaptiveClipSettings(initial_l2_norm_clip=0.5)
    process = class_aware.ClassAwareFactory.shared_noise(splits, clip, WEIGHTS).create(
        _value_type(size))
    state = class_aware.with_released_categories(process.initialize(), released)
    output = process.next(state, _client_values(np.zeros((num_clients, 6, size))))
    noise = np.asarray(output.result['w'], np.float64)
    # Independent figure: s = mean_c w_c z_v,c from the splits, times C, over m.
    scale = np.mean([WEIGHTS[c] * splits[c].value_noise_multiplier for c in CATS])
    expected_std = scale * clip.initial_l2_norm_clip / m
    assert cal.value_noise_stddev(clip.initial_l2_norm_clip) / m == pytest.approx(expected_std)
    # Two-sided 99.9% chi-square interval for the sample variance of `size` N(0, s^2) draws.
    low, high = stats.chi2.ppf([0.0005, 0.9995], df=size) / size
    variance_ratio = np.mean(noise**2) / expected_std**2
    assert low < variance_ratio < high, (variance_ratio, low, high)
    assert abs(np.mean(noise)) < 4 * expected_std / np.sqrt(size)
    assert class_aware.released_categories(output.state) == tuple(released)

  def test_noise_variance_against_per_category_noise_at_the_seed_policy(self):
    """Per-category noise at the same clips C_c adds ~6x the variance of the one shared draw."""
    policy = policy_lib.default_policy()
    sampling = SamplingSpec('poisson', 1000, 100)
    z = clip_calibration.calibrate_category_noise(policy, sampling, 100)
    m = float(sampling.expected_clients_per_round)
    shared_splits = calibration.shared_noise_splits(z, m, max_count_noise_fraction=0.5)
    per_category_splits = clip_calibration.category_splits(z, m, max_count_noise_fraction=0.5)
    cal = calibration.calibrate_shared_noise(shared_splits)
    predicted = cal.per_category_noise_variance_ratio(
        {c: per_category_splits[c].value_noise_multiplier for c in CATS})
    assert 6.0 <= predicted < 6.6, predicted
    base_clip, size = 0.2, 20000
    clips = cal.clip_norms(base_clip)
    per_category = class_aware.ClassAwareFactory(collections.OrderedDict(
        (c, tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
            noise_multiplier=float(per_category_splits[c].tff_noise_multiplier),
            clients_per_round=m, initial_l2_norm_clip=float(clips[c]),
            clipped_count_stddev=float(per_category_splits[c].clipped_count_stddev)))
        for c in CATS), is_dp=True).create(_value_type(size))
    shared = class_aware.ClassAwareFactory.shared_noise(
        shared_splits, class_aware.AdaptiveClipSettings(base_clip)).create(_value_type(size))
    zeros = _client_values(np.zeros((3, 6, size)))
    variances = {}
    for name, process in (('per_category', per_category), ('shared', shared)):
      noise = np.asarray(process.next(process.initialize(), zeros).result['w'], np.float64)
      variances[name] = np.mean(noise**2)
    measured = variances['per_category'] / variances['shared']
    # Ratio of two independent sample variances: F(size, size); 99.9% two-sided interval.
    low, high = stats.f.ppf([0.0005, 0.9995], size, size)
    assert low < measured / predicted < high, (measured, predicted)
    print(f'seed policy: per-category / shared noise variance = {measured:.3f} '
          f'(predicted {predicted:.3f})')

  def test_adaptive_base_clip_counts_a_client_clipped_if_any_released_category_is(self):
    """Noise-free quantile step: C' = C exp(-lr (unclipped fraction - target))."""
    cal = calibration.calibrate_shared_noise(_splits(), WEIGHTS)
    base_clip, lr, target, size = 1.0, 0.2, 0.5, 3
    updates = np.zeros((4, 6, size))
    # Client 0: within every clip except HeadCT's (ratio 1.5); client 1: all within.
    for i, c in enumerate(CATS):
      updates[:2, i, 0] = 0.5 * cal.clip_norms(base_clip)[c]
    updates[0, 0, 0] = 1.5 * cal.clip_norms(base_clip)['HeadCT']
    process = _exact_factory(4, clip_ratios=cal.clip_ratios, weights=WEIGHTS,
                             initial_clip=base_clip, learning_rate=lr, target=target
                            ).create(_value_type(size))
    values = _client_values(updates)
    released_all = process.next(process.initialize(), values)
    assert shared_noise.base_clip_norm(released_all.state) == pytest.approx(
        base_clip * math.exp(-lr * (3 / 4 - target)), rel=1e-6)
    frozen = class_aware.with_released_categories(process.initialize(), CATS[1:])
    head_frozen = process.next(frozen, values)
    # HeadCT frozen: its sub-update neither counts nor contributes.
    assert shared_noise.base_clip_norm(head_frozen.state) == pytest.approx(
        base_clip * math.exp(-lr * (1.0 - target)), rel=1e-6)
    expected = sum(WEIGHTS[c] * updates[:, i].sum(axis=0) for i, c in enumerate(CATS)
                   if c != 'HeadCT') / 4
    np.testing.assert_allclose(head_frozen.result['w'], expected, rtol=1e-5)

  def test_dp_events_are_the_calibrated_multipliers_and_frozen_spend_nothing(self):
    splits = _splits(m=5.0)
    process = class_aware.ClassAwareFactory.shared_noise(splits, combination_weights=WEIGHTS
                                                        ).create(_value_type(2))
    output = process.next(process.initialize(), _client_values(np.ones((2, 6, 2))))
    events = class_aware.dp_events(output.state)
    for c in CATS:
      removal, whole_client = events[c]
      assert isinstance(removal, dp_accounting.GaussianDpEvent)
      assert removal.noise_multiplier == pytest.approx(SEED_Z[c], rel=1e-5)
      # Relation (b): the one shared count moves by 0.5 (multiplier 2 s_n), never more than (a).
      value = splits[c].value_noise_multiplier
      expected = (value**-2 + (2 * splits[c].clipped_count_stddev)**-2)**-0.5
      assert whole_client.noise_multiplier == pytest.approx(expected, rel=1e-5)
      assert whole_client.noise_multiplier >= removal.noise_multiplier
    state = class_aware.with_released_categories(output.state, ['CXR', 'Hand'])
    second = process.next(state, _client_values(np.ones((2, 6, 2))))
    events = class_aware.dp_events(second.state)
    assert [c for c in CATS if events[c] is not None] == ['CXR', 'Hand']
    # The ledger takes them as they are.
    ledger = ledger_lib.PrivacyLedger(policy_lib.default_policy(), SEED_Z,
                                      SamplingSpec('poisson', 1000, 100),
                                      noise_mechanism='shared_noise')
    ledger.record_round(events)
    assert ledger.rounds_released('CXR') == 1 and ledger.rounds_released('HeadCT') == 0


# --- Ledger -------------------------------------------------------------------------------------


class TestLedger:
  POLICY = policy_lib.default_policy()
  SAMPLING = SamplingSpec('poisson', 1000, 100)

  def _events(self, zs):
    return {c: None if z is None else dp_accounting.GaussianDpEvent(z) for c, z in zs.items()}

  def test_epsilons_equal_independent_dp_accounting(self):
    ledger = ledger_lib.PrivacyLedger(self.POLICY, SEED_Z, self.SAMPLING,
                                      noise_mechanism='shared_noise')
    rounds = 5
    for _ in range(rounds):
      ledger.record_round(self._events(SEED_Z))
    delta = self.POLICY.delta
    for c in CATS:
      assert ledger.epsilon_spent(c) == pytest.approx(
          reference_epsilon([(0.1, SEED_Z[c], rounds)], delta), rel=1e-9)
    client_z = 1 / sum(1 / z for z in SEED_Z.values())
    assert ledger.client_level_epsilon == pytest.approx(
        reference_epsilon([(0.1, client_z, rounds)], delta), rel=1e-9)
    # The same rounds under per-category noise compose as independent Gaussians: smaller.
    default = ledger_lib.PrivacyLedger(self.POLICY, SEED_Z, self.SAMPLING)
    for _ in range(rounds):
      default.record_round(self._events(SEED_Z))
    assert default.client_level_epsilon < ledger.client_level_epsilon
    assert default.epsilon_spent('CXR') == ledger.epsilon_spent('CXR')

  def test_frozen_category_spends_nothing_and_leaves_the_client_sum(self):
    ledger = ledger_lib.PrivacyLedger(self.POLICY, SEED_Z, self.SAMPLING,
                                      noise_mechanism='shared_noise')
    ledger.record_round(self._events(SEED_Z))
    head = ledger.epsilon_spent('HeadCT')
    partial = dict(SEED_Z, HeadCT=None, BreastMRI=None)
    ledger.record_round(self._events(partial))
    assert ledger.epsilon_spent('HeadCT') == head
    assert ledger.rounds_released('HeadCT') == 1
    full_z = 1 / sum(1 / z for z in SEED_Z.values())
    partial_z = 1 / sum(1 / z for z in partial.values() if z is not None)
    reference = accounting.epsilon([
        accounting.round_event(full_z, self.SAMPLING),
        accounting.round_event(partial_z, self.SAMPLING)], self.POLICY.delta)
    assert ledger.client_level_epsilon == pytest.approx(reference, rel=1e-9)

  def test_json_names_the_mechanism_and_old_ledgers_still_validate(self):
    ledger = ledger_lib.PrivacyLedger(self.POLICY, SEED_Z, self.SAMPLING,
                                      noise_mechanism='shared_noise')
    ledger.record_round(self._events(SEED_Z))
    published = ledger.to_json_dict()
    assert published['noise_mechanism'] == 'shared_noise'
    ledger_lib.validate_ledger_json(published)
    old = dict(published)
    del old['noise_mechanism']
    ledger_lib.validate_ledger_json(old)
    with pytest.raises(PolicyError, match=re.escape(
        "noise_mechanism must be one of per_category_noise, shared_noise. Found 'scale'.")):
      ledger_lib.validate_ledger_json(dict(published, noise_mechanism='scale'))
    # The default ledger's published shape is unchanged.
    assert 'noise_mechanism' not in ledger_lib.PrivacyLedger(self.POLICY, SEED_Z,
                                                             self.SAMPLING).to_json_dict()

  def test_state_round_trip_and_mechanism_mismatch(self):
    ledger = ledger_lib.PrivacyLedger(self.POLICY, SEED_Z, self.SAMPLING,
                                      noise_mechanism='shared_noise')
    ledger.record_round(self._events(SEED_Z))
    state = json.loads(json.dumps(ledger.state()))
    restored = ledger_lib.PrivacyLedger.from_state(state, self.POLICY,
                                                   noise_mechanism='shared_noise')
    assert restored.client_level_epsilon == ledger.client_level_epsilon
    assert restored.noise_mechanism is calibration.NoiseMechanism.SHARED_NOISE
    with pytest.raises(PolicyError, match=re.escape(
        "noise_mechanism: 'shared_noise' vs 'per_category_noise'")):
      ledger_lib.PrivacyLedger.from_state(state, self.POLICY,
                                          noise_mechanism='per_category_noise')
    # A state saved before the option existed is per-category noise.
    old = ledger_lib.PrivacyLedger(self.POLICY, SEED_Z, self.SAMPLING).state()
    del old['noise_mechanism']
    assert ledger_lib.PrivacyLedger.from_state(old, self.POLICY).noise_mechanism is (
        calibration.NoiseMechanism.PER_CATEGORY_NOISE)
    with pytest.raises(PolicyError, match='noise_mechanism must be one of'):
      ledger_lib.PrivacyLedger(self.POLICY, SEED_Z, self.SAMPLING, noise_mechanism='scale')


# --- Configuration and the training program -----------------------------------------------------


def test_config_refuses_an_unknown_mechanism():
  config = config_lib.base_config()
  assert config.dp_mechanism == 'per_category_noise'
  config.dp_mechanism = 'scale'
  with pytest.raises(ConfigError, match=re.escape(
      "dp_mechanism must be one of per_category_noise, shared_noise. Found 'scale'.")):
    config_lib.validate(config)


@pytest.mark.usefixtures('tff_context')
def test_program_runs_shared_noise_and_writes_a_valid_ledger(tmp_path):
  from tff_medical.training import program  # pylint: disable=g-import-not-at-top

  run_dir = str(tmp_path / 'shared')
  result = program.run(
      smoke_config(total_rounds=3, eval_every=3, dp_mechanism='shared_noise'), run_dir)
  assert result.rounds_completed == 3
  with open(os.path.join(run_dir, 'privacy_ledger.json')) as f:
    published = json.load(f)
  ledger_lib.validate_ledger_json(published)
  assert published['noise_mechanism'] == 'shared_noise'
  zs = {c: published['categories'][c]['noise_multiplier'] for c in CATS}
  rate = published['sampling']['rate']
  for c in CATS:
    assert published['categories'][c]['rounds_released'] == 3
    assert published['categories'][c]['epsilon_spent'] == pytest.approx(
        reference_epsilon([(rate, zs[c], 3)], published['delta']), rel=1e-6)
  client_z = 1 / sum(1 / z for z in zs.values())
  assert published['client_level_epsilon'] == pytest.approx(
      reference_epsilon([(rate, client_z, 3)], published['delta']), rel=1e-6)
  with open(os.path.join(run_dir, 'config.json')) as f:
    plan = json.load(f)['plan']
  assert len({s['clipped_count_stddev'] for s in plan['splits'].values()}) == 1
