"""The class-aware aggregation factory: types, exact sums, noise statistics, freezing, refusals."""

import collections
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_medical import categories
from tff_medical.aggregation import class_aware
from tff_medical.errors import PolicyError
from tff_medical.privacy import calibration

from helpers import assert_gaussian_noise  # pylint: disable=g-bad-import-order

CATS = categories.CATEGORY_IDS


def _value_type(size):
  update = tff.StructWithPythonType([('w', tff.TensorType(np.float32, [size]))],
                                    collections.OrderedDict)
  return tff.StructWithPythonType([(c, update) for c in CATS], collections.OrderedDict)


def _client_values(array):
  """array[k, c, :] -> one struct per client k."""
  return [collections.OrderedDict(
      (c, collections.OrderedDict(w=array[k, i].astype(np.float32))) for i, c in enumerate(CATS))
          for k in range(array.shape[0])]


def _uniform(value):
  return {c: value for c in CATS}


def _splits(z, m, count_stddev):
  """The same split for every category (z effective, m clients per round, s count stddev)."""
  return {c: calibration.adaptive_clip_split(z, m, count_stddev) for c in CATS}


# --- Type signatures (no execution) -------------------------------------------------------------


class TestTypeSignatures:

  def test_dp_process_types(self):
    value_type = _value_type(4)
    process = class_aware.ClassAwareFactory.dp(_splits(1.0, 10.0, 5.0)).create(value_type)
    state_type = process.initialize.type_signature.result
    assert state_type.placement is tff.SERVER
    assert list(state_type.member[class_aware.STATE_INNER]._name_to_index) == list(CATS)
    assert state_type.member[class_aware.STATE_RELEASED] == tff.TensorType(np.float32, [6])
    next_type = process.next.type_signature
    assert next_type.parameter[1] == tff.FederatedType(value_type, tff.CLIENTS)
    result = next_type.result.result
    assert result.placement is tff.SERVER
    assert result.member.is_equivalent_to(value_type[CATS[0]])
    assert list(next_type.result.measurements.member._name_to_index) == list(CATS)

  def test_non_private_process_types(self):
    process = class_aware.ClassAwareFactory.non_private().create(_value_type(2))
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
      class_aware.ClassAwareFactory.non_private().create(value_type)


# --- Refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize('kwargs, message', [
    (dict(splits={c: s for c, s in _splits(1.0, 10.0, 5.0).items() if c != 'Hand'}),
     "splits must map each of ['HeadCT', 'BreastMRI', 'AbdomenCT', 'ChestCT', 'CXR', 'Hand'] "
     "to an AdaptiveClipSplit. Found ['AbdomenCT', 'BreastMRI', 'CXR', 'ChestCT', 'HeadCT']."),
    (dict(splits=dict(_splits(1.0, 10.0, 5.0),
                      CXR=calibration.adaptive_clip_split(1.0, 10.0, 5.0).to_json_dict())),
     'splits[CXR] must be an AdaptiveClipSplit. Found {'),
    (dict(splits=dict(_splits(1.0, 10.0, 5.0),
                      Hand=calibration.adaptive_clip_split(1.0, 12.0, 5.0))),
     'splits must all have the same expected_clients_per_round (one client sample serves every '
     'category). Found {'),
    (dict(combination_weights=dict(_uniform(1.0), Hand=-1.0)), 'combination_weights must'),
], ids=['missing_category', 'not_a_split', 'different_clients_per_round', 'negative_weight'])
def test_dp_refuses_invalid_parameters(kwargs, message):
  args = dict(splits=_splits(1.0, 10.0, 5.0))
  args.update(kwargs)
  with pytest.raises(PolicyError, match=re.escape(message)):
    class_aware.ClassAwareFactory.dp(**args)


def test_dp_accepts_splits_in_any_key_order():
  # A plan read back from JSON saved with sort_keys has its categories in alphabetical order.
  splits = _splits(1.0, 10.0, 5.0)
  factory = class_aware.ClassAwareFactory.dp(dict(sorted(splits.items())))
  assert factory.is_dp


def test_clip_settings_refused():
  with pytest.raises(PolicyError, match='initial_l2_norm_clip must be positive'):
    class_aware.AdaptiveClipSettings(initial_l2_norm_clip=0.0)
  with pytest.raises(PolicyError, match='target_unclipped_quantile must be in'):
    class_aware.AdaptiveClipSettings(target_unclipped_quantile=1.5)


def test_category_query_refuses_what_is_not_a_split():
  with pytest.raises(PolicyError, match='split must be an AdaptiveClipSplit'):
    class_aware.category_query({'z': 1.0})


@pytest.mark.usefixtures('tff_context')
def test_category_query_is_tffs_gaussian_adaptive_query():
  # The public constructor both runtimes use must build what TFF's gaussian_adaptive builds:
  # same value and count noise, clip, quantile and learning rate, hence the same initial state.
  split = calibration.adaptive_clip_split(1.3, 10.0, 5.0)
  clip = class_aware.AdaptiveClipSettings(0.2, 0.6, 0.3)
  update_type = _value_type(3)[CATS[0]]
  ours = tff.aggregators.DifferentiallyPrivateFactory(
      class_aware.category_query(split, clip)).create(update_type).initialize()
  tffs = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
      noise_multiplier=split.tff_noise_multiplier,
      clients_per_round=split.expected_clients_per_round,
      initial_l2_norm_clip=0.2, target_unclipped_quantile=0.6, learning_rate=0.3,
      clipped_count_stddev=split.clipped_count_stddev).create(update_type).initialize()
  flat_ours, flat_tffs = tf.nest.flatten(ours.query_state), tf.nest.flatten(tffs.query_state)
  assert len(flat_ours) == len(flat_tffs) > 5
  np.testing.assert_allclose(np.array(flat_ours, np.float64), np.array(flat_tffs, np.float64))


def test_category_queries_refuse_splits_of_different_client_counts():
  splits = _splits(1.0, 10.0, 5.0)
  splits[CATS[2]] = calibration.adaptive_clip_split(1.0, 12.0, 5.0)
  with pytest.raises(PolicyError, match='same expected_clients_per_round'):
    class_aware.category_queries(splits)


# --- Execution ----------------------------------------------------------------------------------


@pytest.mark.usefixtures('tff_context')
class TestExecution:

  def test_non_private_is_sum_over_categories_of_plain_means(self):
    rng = np.random.default_rng(1)
    updates = rng.normal(size=(5, 6, 3))
    process = class_aware.ClassAwareFactory.non_private().create(_value_type(3))
    output = process.next(process.initialize(), _client_values(updates))
    np.testing.assert_allclose(output.result['w'], updates.mean(axis=0).sum(axis=0), rtol=1e-5)

  def test_zero_noise_without_clipping_equals_plain_mean(self):
    """DP machinery with noise 0 and a clip that never binds is exactly plain averaging."""
    rng = np.random.default_rng(2)
    num_clients = 7
    updates = rng.normal(size=(num_clients, 6, 5))
    weights = {c: w for c, w in zip(CATS, [0.5, 1.0, 2.0, 0.0, 1.5, 3.0])}
    factories = collections.OrderedDict(
        (c, tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
            noise_multiplier=0.0, clients_per_round=float(num_clients), clip=1e9)) for c in CATS)
    process = class_aware.ClassAwareFactory(factories, weights, is_dp=True).create(
        _value_type(5))
    output = process.next(process.initialize(), _client_values(updates))
    expected = sum(weights[c] * updates[:, i].mean(axis=0) for i, c in enumerate(CATS))
    np.testing.assert_allclose(output.result['w'], expected, rtol=1e-5, atol=1e-6)

  @pytest.mark.parametrize('category', ['HeadCT', 'ChestCT', 'Hand'])
  def test_released_noise_has_calibrated_stddev(self, category):
    """All updates zero: what category c releases is pure noise of std z_value*C/m."""
    size, num_clients, m = 20000, 4, 8.0
    z = {c: z for c, z in zip(CATS, [7.9, 7.9, 4.3, 4.3, 2.4, 2.4])}
    count_stddev = {c: 3.0 * z[c] for c in CATS}
    splits = {c: calibration.adaptive_clip_split(z[c], m, count_stddev[c]) for c in CATS}
    clip = class_aware.AdaptiveClipSettings(initial_l2_norm_clip=0.5)
    factory = class_aware.ClassAwareFactory.dp(splits, clip)
    process = factory.create(_value_type(size))
    state = class_aware.with_released_categories(process.initialize(), [category])
    output = process.next(state, _client_values(np.zeros((num_clients, 6, size))))
    noise = np.asarray(output.result['w'], np.float64)
    # Independent figure: the value share of z when the count (sensitivity 1 per category) has
    # multiplier s.
    value_z = (z[category]**-2 - count_stddev[category]**-2)**-0.5
    assert_gaussian_noise(noise, value_z * clip.initial_l2_norm_clip / m)

  def test_frozen_category_releases_nothing_and_keeps_its_state(self):
    rng = np.random.default_rng(3)
    updates = rng.normal(size=(6, 6, 4))
    factory = class_aware.ClassAwareFactory.dp(_splits(1.0, 6.0, 5.0))
    process = factory.create(_value_type(4))
    first = process.next(process.initialize(), _client_values(updates))
    norms_before = class_aware.clip_norms(first.state)
    events_before = class_aware.dp_events(first.state)
    assert all(events_before[c] is not None for c in CATS)

    state = class_aware.with_released_categories(first.state, ['CXR'])
    second = process.next(state, _client_values(updates))
    norms_after = class_aware.clip_norms(second.state)
    events = class_aware.dp_events(second.state)
    assert [c for c in CATS if events[c] is not None] == ['CXR']
    for c in CATS:
      if c == 'CXR':
        assert norms_after[c] != norms_before[c]
      else:
        assert norms_after[c] == norms_before[c]

  def test_frozen_categories_are_absent_from_the_combined_update(self):
    rng = np.random.default_rng(4)
    updates = rng.normal(size=(3, 6, 2))
    process = class_aware.ClassAwareFactory.non_private().create(_value_type(2))
    state = class_aware.with_released_categories(process.initialize(), ['HeadCT', 'Hand'])
    output = process.next(state, _client_values(updates))
    expected = updates[:, 0].mean(axis=0) + updates[:, 5].mean(axis=0)
    np.testing.assert_allclose(output.result['w'], expected, rtol=1e-5)
    assert class_aware.released_categories(output.state) == ('HeadCT', 'Hand')

  def test_dp_event_is_the_effective_multiplier(self):
    """dp_events reports one Gaussian per category: the effective z the accountant is fed."""
    import dp_accounting  # pylint: disable=g-import-not-at-top

    splits = {c: calibration.adaptive_clip_split(1.0 + i, 5.0, 3.0 * (1.0 + i))
              for i, c in enumerate(CATS)}
    factory = class_aware.ClassAwareFactory.dp(splits)
    process = factory.create(_value_type(2))
    output = process.next(process.initialize(), _client_values(np.zeros((2, 6, 2))))
    events = class_aware.dp_events(output.state)
    for c in CATS:
      removal, whole_client = events[c]
      assert isinstance(removal, dp_accounting.GaussianDpEvent)
      assert removal.noise_multiplier == pytest.approx(splits[c].noise_multiplier, rel=1e-5)
      # Relation (b): c's value and count, and every other released count at sensitivity 0.5.
      expected = (splits[c].value_noise_multiplier**-2 + sum(
          (2 * splits[d].clipped_count_stddev)**-2 for d in CATS))**-0.5
      assert whole_client.noise_multiplier == pytest.approx(expected, rel=1e-5)

  def test_whole_client_event_counts_only_released_categories(self):
    splits = {c: calibration.adaptive_clip_split(2.0, 5.0, 7.0) for c in CATS}
    process = class_aware.ClassAwareFactory.dp(splits).create(_value_type(2))
    state = class_aware.with_released_categories(process.initialize(), ['HeadCT', 'CXR'])
    output = process.next(state, _client_values(np.zeros((2, 6, 2))))
    events = class_aware.dp_events(output.state)
    assert [c for c in CATS if events[c] is not None] == ['HeadCT', 'CXR']
    expected = (splits['CXR'].value_noise_multiplier**-2 + 2 * (2 * 7.0)**-2)**-0.5
    assert events['CXR'].remove_whole_client.noise_multiplier == pytest.approx(expected, rel=1e-5)


def test_with_released_categories_rejects_unknown():
  with pytest.raises(PolicyError, match='Knee'):
    class_aware.with_released_categories({class_aware.STATE_RELEASED: np.ones(6)}, ['Knee'])
