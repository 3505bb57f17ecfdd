"""Shared-noise ("Scale") class-aware aggregation: per-category clips, ONE noise draw.

The mechanism and its state: docs/PRIVACY.md; its calibration: privacy/shared_noise_calibration.py.
"""

import collections
from collections.abc import Mapping
from typing import Any, Optional

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import differential_privacy
import tensorflow_privacy as tfp

from tff_medical import categories
from tff_medical.aggregation import category_struct
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration
from tff_medical.privacy import shared_noise_calibration

CATS = categories.CATEGORY_IDS


class SharedNoiseQuery(tfp.SumAggregationDPQuery):
  """Per-category clipping, weighted sum over categories, one Gaussian; adaptive base clip.

  Records are {category: sub-update}; the result is one sub-update. Modelled on TF Privacy's
  QuantileAdaptiveClipSumQuery (GaussianSumQuery for the noise, QuantileEstimatorQuery for the
  clip), which clips a whole record to one norm: here each category has its own clip.
  """

  GlobalState = collections.namedtuple(
      'GlobalState', ['noise_scale', 'clip_ratios', 'weights', 'released', 'sum_state',
                       'quantile_estimator_state'])
  _SampleState = collections.namedtuple('_SampleState',
                                        ['sum_state', 'quantile_estimator_state'])
  _SampleParams = collections.namedtuple(
      '_SampleParams', ['clips', 'scales', 'clip_ratios', 'quantile_estimator_params'])

  def __init__(self, initial_l2_norm_clip: float, noise_scale: float, clip_ratios, weights,
               target_unclipped_quantile: float, learning_rate: float,
               clipped_count_stddev: float, expected_num_records: float,
               geometric_update: bool = True):
    self._noise_scale = float(noise_scale)
    self._clip_ratios = np.asarray(clip_ratios, np.float32)
    self._weights = np.asarray(weights, np.float32)
    self._sum_query = tfp.GaussianSumQuery(initial_l2_norm_clip,
                                           noise_scale * initial_l2_norm_clip)
    self._quantile_estimator_query = tfp.QuantileEstimatorQuery(
        initial_l2_norm_clip, target_unclipped_quantile, learning_rate, clipped_count_stddev,
        expected_num_records, geometric_update)

  def initial_global_state(self):
    return self.GlobalState(
        tf.constant(self._noise_scale, tf.float32), tf.constant(self._clip_ratios),
        tf.constant(self._weights), tf.ones([categories.NUM_CATEGORIES], tf.float32),
        self._sum_query.initial_global_state(),
        self._quantile_estimator_query.initial_global_state())

  def derive_sample_params(self, global_state):
    base_clip = self._sum_query.derive_sample_params(global_state.sum_state)
    return self._SampleParams(
        base_clip * global_state.clip_ratios, global_state.weights * global_state.released,
        global_state.clip_ratios,
        self._quantile_estimator_query.derive_sample_params(
            global_state.quantile_estimator_state))

  def initial_sample_state(self, template):
    return self._SampleState(
        self._sum_query.initial_sample_state(_category(template, CATS[0])),
        self._quantile_estimator_query.initial_sample_state())

  def preprocess_record(self, params, record):
    parts, ratios = [], []
    for index, category_id in enumerate(CATS):
      sub_update = _category(record, category_id)
      flat = tf.nest.flatten(sub_update)
      clipped, norm = tf.clip_by_global_norm(flat, params.clips[index])
      parts.append([params.scales[index] * tf.cast(t, tf.float32) for t in clipped])
      # A frozen category (scale 0) must not move the clip: its norm is left out.
      ratios.append(tf.where(params.scales[index] > 0, norm / params.clip_ratios[index], 0.0))
    template = _category(record, CATS[0])
    combined = [tf.cast(tf.add_n(ts), t.dtype)
                for ts, t in zip(zip(*parts), tf.nest.flatten(template))]
    was_unclipped = self._quantile_estimator_query.preprocess_record(
        params.quantile_estimator_params, tf.reduce_max(tf.stack(ratios)))
    return self._SampleState(tf.nest.pack_sequence_as(template, combined), was_unclipped)

  def get_noised_result(self, sample_state, global_state):
    applied = global_state.sum_state
    noised, _, _ = self._sum_query.get_noised_result(sample_state.sum_state, applied)
    new_clip, new_quantile_state, count_event = self._quantile_estimator_query.get_noised_result(
        sample_state.quantile_estimator_state, global_state.quantile_estimator_state)
    new_clip = tf.maximum(new_clip, 0.0)
    new_state = global_state._replace(
        sum_state=self._sum_query.make_global_state(new_clip,
                                                    new_clip * global_state.noise_scale),
        quantile_estimator_state=new_quantile_state)
    # Each category's value multiplier from what was applied: sigma / (w_c C_c).
    value_multipliers = applied.stddev / (
        global_state.weights * applied.l2_norm_clip * global_state.clip_ratios)
    event = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(value_multipliers[i]) for i in range(len(CATS))] +
        [count_event])
    return noised, new_state, event

  def derive_metrics(self, global_state):
    return collections.OrderedDict(clip=global_state.sum_state.l2_norm_clip)


def _category(value, category_id):
  if isinstance(value, Mapping):
    return value[category_id]
  if isinstance(value, tff.structure.Struct):
    return value[category_id]
  return getattr(value, category_id)


class SharedNoiseFactory(tff.aggregators.UnweightedAggregationFactory):
  """Aggregates {category: sub-update} structs with per-category clips and one noise draw.

  Build with `from_splits` (calibrated) or ClassAwareFactory.shared_noise; the constructor takes
  the raw constants (tests use it with zero noise).
  """

  def __init__(self, *, noise_scale: float, clip_ratios: Mapping[str, float],
               combination_weights: Mapping[str, float], clipped_count_stddev: float,
               expected_clients_per_round: float,
               clip: category_struct.AdaptiveClipSettings = category_struct.AdaptiveClipSettings()):
    if not isinstance(clip, category_struct.AdaptiveClipSettings):
      raise PolicyError(f'clip must be an AdaptiveClipSettings. Found {clip!r}.')
    self._noise_scale = _non_negative('noise_scale', noise_scale)
    self._clip_ratios = _per_category('clip_ratios', clip_ratios)
    self._weights = _per_category('combination_weights', combination_weights)
    self._count_stddev = _non_negative('clipped_count_stddev', clipped_count_stddev)
    self._clients = accounting.positive('expected_clients_per_round',
                                             expected_clients_per_round)
    self._clip = clip
    # The SharedNoiseCalibration it was built from (from_splits), for the run's record.
    self.calibration: Optional[shared_noise_calibration.SharedNoiseCalibration] = None

  @classmethod
  def from_splits(cls,
                  splits: Mapping[str, calibration.AdaptiveClipSplit],
                  clip: category_struct.AdaptiveClipSettings = category_struct.AdaptiveClipSettings(),
                  combination_weights: Optional[Mapping[str, float]] = None,
                  category_fractions: Optional[Mapping[str, float]] = None
                 ) -> 'SharedNoiseFactory':
    """The calibrated mechanism (shared_noise_calibration.calibrate_shared_noise).

    Args:
      splits: {category: AdaptiveClipSplit} sharing one clipped_count_stddev and one m
        (tff_medical.privacy.shared_noise_calibration.shared_noise_splits).
      clip: Adaptive settings of the base clip C.
      combination_weights: w_c > 0 (default 1.0).
      category_fractions: Weights of the mean defining the scale s (default uniform).
    """
    cal = shared_noise_calibration.calibrate_shared_noise(splits, combination_weights,
                                                          category_fractions)
    factory = cls(noise_scale=cal.noise_scale, clip_ratios=cal.clip_ratios,
                  combination_weights=cal.combination_weights,
                  clipped_count_stddev=cal.clipped_count_stddev,
                  expected_clients_per_round=cal.expected_clients_per_round, clip=clip)
    factory.calibration = cal
    return factory

  @property
  def is_dp(self) -> bool:
    return True

  def create(self, value_type) -> tff.templates.AggregationProcess:
    update_type = category_struct.check_category_struct(value_type)
    del update_type
    query = tfp.NormalizedQuery(
        SharedNoiseQuery(
            initial_l2_norm_clip=float(self._clip.initial_l2_norm_clip),
            noise_scale=self._noise_scale,
            clip_ratios=[self._clip_ratios[c] for c in CATS],
            weights=[self._weights[c] for c in CATS],
            target_unclipped_quantile=float(self._clip.target_unclipped_quantile),
            learning_rate=float(self._clip.learning_rate),
            clipped_count_stddev=self._count_stddev,
            expected_num_records=self._clients),
        denominator=self._clients)
    inner = tff.aggregators.DifferentiallyPrivateFactory(query).create(value_type)
    inner_state_type = inner.initialize.type_signature.result.member
    query_state_type = inner_state_type.query_state
    released_type = tff.TensorType(np.float32, [categories.NUM_CATEGORIES])

    @tff.tensorflow.computation
    def all_released():
      return tf.ones([categories.NUM_CATEGORIES], tf.float32)

    @tff.federated_computation()
    def init_fn():
      return tff.federated_zip(collections.OrderedDict([
          (category_struct.STATE_INNER, inner.initialize()),
          (category_struct.STATE_RELEASED, tff.federated_eval(all_released, tff.SERVER)),
      ]))

    # The released mask lives in the outer state (class_aware's helpers set it); the query reads
    # it from its own state, so it is copied in before each round.
    @tff.tensorflow.computation(query_state_type, released_type)
    def set_released(query_state, released):
      # NormalizedQuery state (numerator_state, denominator); both are namedtuples in TF.
      numerator, denominator = category_struct.to_nest(query_state)
      numerator = SharedNoiseQuery.GlobalState(*numerator)._replace(released=released)
      return type(query_state)(numerator, denominator) if hasattr(
          query_state, '_fields') else (numerator, denominator)

    @tff.federated_computation(init_fn.type_signature.result,
                               tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      released = state[category_struct.STATE_RELEASED]
      query_state, agg_state, dp_event, is_init_state = state[category_struct.STATE_INNER]
      query_state = tff.federated_map(set_released, (query_state, released))
      inner_state = tff.federated_zip(differential_privacy.DPAggregatorState(
          query_state, agg_state, dp_event, is_init_state))
      output = inner.next(inner_state, value)
      new_state = tff.federated_zip(collections.OrderedDict([
          (category_struct.STATE_INNER, output.state), (category_struct.STATE_RELEASED, released)]))
      return tff.templates.MeasuredProcessOutput(
          state=new_state, result=output.result, measurements=output.measurements)

    return tff.templates.AggregationProcess(init_fn, next_fn)


def _non_negative(field: str, value: Any) -> float:
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float('nan')
  if isinstance(value, bool) or not (np.isfinite(number) and number >= 0):
    raise PolicyError(f'{field} must be a non-negative number. Found {value!r}.')
  return number


def _per_category(field: str, value: Any) -> dict[str, float]:
  if not isinstance(value, Mapping) or set(value) != set(CATS):
    found = sorted(map(str, value)) if isinstance(value, Mapping) else value
    raise PolicyError(f'{field} must map each of {list(CATS)} to a positive number. '
                      f'Found {found!r}.')
  return {c: accounting.positive(f'{field}[{c}]', value[c]) for c in CATS}


def is_shared_noise_state(state: Any) -> bool:
  """Whether an aggregator state is this factory's (not ClassAwareFactory's per-category one)."""
  inner = state[category_struct.STATE_INNER]
  return not (isinstance(inner, Mapping) and list(inner) == list(CATS))


def _numerator_state(state: Any):
  """(DPAggregatorState, SharedNoiseQuery state) of an aggregator state."""
  dp_state = category_struct.as_dp_state(state[category_struct.STATE_INNER])
  # NormalizedQuery(SharedNoiseQuery) state: (numerator_state, denominator).
  query_state = dp_state.query_state
  if isinstance(query_state, Mapping) or hasattr(query_state, '_fields'):
    return dp_state, category_struct.field(query_state, 'numerator_state')
  return dp_state, query_state[0]


def dp_events(state: Any) -> dict[str, Optional[accounting.CategoryRoundEvents]]:
  """One CategoryRoundEvents per released category (None if frozen), from the applied mechanism.

  The state's event is [Gaussian(z_v,c) for each category] + [count Gaussian at sensitivity
  0.5]; category c's is accounting.category_event of (its value Gaussian, the count), i.e.
  (z_v,c**-2 + s_n**-2)**-0.5, the same per-category event as ClassAwareFactory.dp's.
  """
  dp_state, _ = _numerator_state(state)
  event = differential_privacy.extract_dp_event_from_state(dp_state)
  parts = list(getattr(event, 'events', ()))
  if not isinstance(event, dp_accounting.ComposedDpEvent) or len(parts) != len(CATS) + 1:
    raise PolicyError('a shared-noise aggregator state must record ComposedDpEvent of six value '
                      f'Gaussians and the count. Found {event!r}.')
  released = category_struct.released_categories(state)
  # Relation (b): a whole client moves the one shared count by 0.5, as TFF records it, so its
  # round is the value Gaussian with the count as recorded (never more than relation (a)).
  return {
      c: accounting.CategoryRoundEvents(
          accounting.category_event(dp_accounting.ComposedDpEvent([parts[i], parts[-1]])),
          dp_accounting.GaussianDpEvent(accounting.effective_noise_multiplier(
              dp_accounting.ComposedDpEvent([parts[i], parts[-1]]))))
      if c in released else None for i, c in enumerate(CATS)
  }


def clip_norms(state: Any) -> dict[str, float]:
  """Each category's current clip C_c = r_c * C (public: C is a DP output)."""
  _, numerator = _numerator_state(state)
  base = float(category_struct.field(category_struct.field(numerator, 'sum_state'), 'l2_norm_clip'))
  ratios = np.asarray(category_struct.field(numerator, 'clip_ratios'), np.float64)
  return {c: base * float(ratios[i]) for i, c in enumerate(CATS)}


def base_clip_norm(state: Any) -> float:
  """The adaptive base clip C."""
  _, numerator = _numerator_state(state)
  return float(category_struct.field(category_struct.field(numerator, 'sum_state'), 'l2_norm_clip'))
