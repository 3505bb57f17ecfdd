"""Class-aware aggregation: one (DP) sub-aggregator per image category, one combined update.

How the categories are kept apart, translated for TFF and frozen: docs/PRIVACY.md.
"""

import collections
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_federated.python.aggregators import differential_privacy

from tff_medical import categories
from tff_medical.aggregation import category_struct
from tff_medical.aggregation import shared_noise
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration

# The shared shape, re-exported: callers name these through class_aware.
STATE_INNER = category_struct.STATE_INNER
STATE_RELEASED = category_struct.STATE_RELEASED
AdaptiveClipSettings = category_struct.AdaptiveClipSettings
check_category_struct = category_struct.check_category_struct
with_released_categories = category_struct.with_released_categories
released_categories = category_struct.released_categories


class ClassAwareFactory(tff.aggregators.UnweightedAggregationFactory):
  """Aggregates a struct of per-category sub-updates into one combined update.

  Use the named constructors `dp` (per-category adaptive-clipping Gaussian mechanism) and
  `non_private` (plain mean per category); the constructor takes any inner factories, which
  tests use to substitute visible doubles.
  """

  def __init__(self,
               category_factories: Mapping[str, tff.aggregators.UnweightedAggregationFactory],
               combination_weights: Optional[Mapping[str, float]] = None,
               is_dp: bool = False):
    if list(category_factories) != list(categories.CATEGORY_IDS):
      raise PolicyError(f'category_factories must have keys {list(categories.CATEGORY_IDS)} in '
                        f'that order. Found {list(category_factories)}.')
    self._factories = dict(category_factories)
    self._weights = category_struct.combination_weight_vector(combination_weights)
    self._is_dp = is_dp

  @classmethod
  def dp(cls,
         splits: Mapping[str, calibration.AdaptiveClipSplit],
         clip: AdaptiveClipSettings = AdaptiveClipSettings(),
         combination_weights: Optional[Mapping[str, float]] = None) -> 'ClassAwareFactory':
    """One gaussian_adaptive DP aggregator per category.

    Args:
      splits: Each category's split of its effective multiplier z_c (the one the accountant is
        fed), from tff_medical.privacy.calibration (`category_splits`); all six categories, with
        the same expected clients per round. TFF is given the split's tff_noise_multiplier, not
        z_c: TFF assumes count sensitivity 0.5, ours is 1 (see docs/PRIVACY.md).
      clip: Adaptive clipping settings shared by every category.
      combination_weights: Weight of each category's sub-aggregate in the combined update.
    """
    queries = category_queries(splits, clip)
    factories = collections.OrderedDict(
        (c, tff.aggregators.DifferentiallyPrivateFactory(queries[c]))
        for c in categories.CATEGORY_IDS)
    return cls(factories, combination_weights, is_dp=True)

  @classmethod
  def shared_noise(cls,
                   splits: Mapping[str, calibration.AdaptiveClipSplit],
                   clip: AdaptiveClipSettings = AdaptiveClipSettings(),
                   combination_weights: Optional[Mapping[str, float]] = None,
                   category_fractions: Optional[Mapping[str, float]] = None):
    """The shared-noise ("Scale") alternative to `dp`: per-category clips, one noise draw.

    See tff_medical.aggregation.shared_noise; splits must share one clipped_count_stddev
    (tff_medical.privacy.shared_noise_calibration.shared_noise_splits). Returns a
    SharedNoiseFactory, whose state the helpers of this module (with_released_categories,
    dp_events, ...) also read.
    """
    return shared_noise.SharedNoiseFactory.from_splits(splits, clip, combination_weights,
                                                       category_fractions)

  @classmethod
  def non_private(
      cls, combination_weights: Optional[Mapping[str, float]] = None) -> 'ClassAwareFactory':
    """Plain mean of each category's sub-updates over the round's clients: DP off."""
    factories = collections.OrderedDict(
        (c, tff.aggregators.UnweightedMeanFactory()) for c in categories.CATEGORY_IDS)
    return cls(factories, combination_weights, is_dp=False)

  @property
  def is_dp(self) -> bool:
    return self._is_dp

  def create(self, value_type) -> tff.templates.AggregationProcess:
    update_type = check_category_struct(value_type)
    processes = collections.OrderedDict(
        (c, self._factories[c].create(update_type)) for c in categories.CATEGORY_IDS)
    num = categories.NUM_CATEGORIES
    weights = self._weights

    inner_state_types = collections.OrderedDict(
        (c, p.initialize.type_signature.result.member) for c, p in processes.items())
    released_type = tff.TensorType(np.float32, [num])
    sub_result_type = processes[categories.CATEGORY_IDS[0]].next.type_signature.result.result.member
    results_type = tff.StructType([(c, sub_result_type) for c in categories.CATEGORY_IDS])

    @tff.tensorflow.computation
    def all_released():
      return tf.ones([num], tf.float32)

    @tff.federated_computation()
    def init_fn():
      inner = collections.OrderedDict((c, p.initialize()) for c, p in processes.items())
      return tff.federated_zip(collections.OrderedDict([
          (STATE_INNER, tff.federated_zip(inner)),
          (STATE_RELEASED, tff.federated_eval(all_released, tff.SERVER)),
      ]))

    state_type = init_fn.type_signature.result

    @tff.tensorflow.computation(results_type, released_type)
    def combine(results, released):
      scale = tf.constant(weights) * released
      results = category_struct.to_nest(results)
      parts = [tf.nest.map_structure(lambda t, s=scale[i]: tf.cast(s, t.dtype) * t, results[c])
               for i, c in enumerate(categories.CATEGORY_IDS)]
      return tf.nest.map_structure(lambda *ts: tf.add_n(ts), *parts)

    def make_keep_if_frozen(index, inner_state_type):
      # A frozen category keeps its old inner state: its clip norm and DP event must not move
      # with data that was never released.
      @tff.tensorflow.computation(inner_state_type, inner_state_type, released_type)
      def keep_if_frozen(old_state, new_state, released):
        keep_new = released[index] > 0.5
        return tf.nest.map_structure(lambda o, n: tf.where(keep_new, n, o), category_struct.to_nest(old_state),
                                     category_struct.to_nest(new_state))

      return keep_if_frozen

    keep_fns = collections.OrderedDict(
        (c, make_keep_if_frozen(i, inner_state_types[c]))
        for i, c in enumerate(categories.CATEGORY_IDS))

    @tff.federated_computation(state_type, tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      released = state[STATE_RELEASED]
      new_inner, results, measurements = (collections.OrderedDict(), collections.OrderedDict(),
                                          collections.OrderedDict())
      for category_id, process in processes.items():
        old_state = state[STATE_INNER][category_id]
        output = process.next(old_state, value[category_id])
        new_inner[category_id] = tff.federated_map(keep_fns[category_id],
                                                   (old_state, output.state, released))
        results[category_id] = output.result
        measurements[category_id] = output.measurements
      return category_struct.round_output(new_inner, results, measurements, combine, released)

    return tff.templates.AggregationProcess(init_fn, next_fn)


def category_query(split: calibration.AdaptiveClipSplit,
                   clip: AdaptiveClipSettings = AdaptiveClipSettings()):
  """The DPQuery of one category: TFF's gaussian_adaptive query at the split's multipliers.

  Both runtimes run it: ClassAwareFactory.dp wraps it in a DifferentiallyPrivateFactory, the
  cross-silo coordinator and sites call it directly (crosssilo/mechanism.py).

  Args:
    split: The category's AdaptiveClipSplit (tff_medical.privacy.calibration).
    clip: Adaptive clipping settings.

  Returns:
    NormalizedQuery(QuantileAdaptiveClipSumQuery) over the split's expected clients per round.
  """
  if not isinstance(split, calibration.AdaptiveClipSplit):
    raise PolicyError(f'split must be an AdaptiveClipSplit. Found {split!r}.')
  clients = float(split.expected_clients_per_round)
  # TFF's own split of its multiplier into value noise and count noise (gaussian_adaptive).
  value_noise_multiplier, count_stddev = differential_privacy.adaptive_clip_noise_params(
      float(split.tff_noise_multiplier), clients, float(split.clipped_count_stddev))
  query = tfp.QuantileAdaptiveClipSumQuery(
      initial_l2_norm_clip=float(clip.initial_l2_norm_clip),
      noise_multiplier=value_noise_multiplier,
      target_unclipped_quantile=float(clip.target_unclipped_quantile),
      learning_rate=float(clip.learning_rate),
      clipped_count_stddev=count_stddev,
      expected_num_records=clients,
      geometric_update=True)
  return tfp.NormalizedQuery(query, denominator=clients)


def category_queries(splits: Mapping[str, calibration.AdaptiveClipSplit],
                     clip: AdaptiveClipSettings = AdaptiveClipSettings()) -> dict[str, Any]:
  """`category_query` of every category, after checking the splits fit one client sample."""
  calibration.check_category_splits(splits)
  clients = {c: splits[c].expected_clients_per_round for c in categories.CATEGORY_IDS}
  if len(set(clients.values())) != 1:
    raise PolicyError('splits must all have the same expected_clients_per_round (one client '
                      f'sample serves every category). Found {clients}.')
  return {c: category_query(splits[c], clip) for c in categories.CATEGORY_IDS}


def dp_events(state: Any) -> dict[str, Any]:
  """The DP events each released category's mechanism applied in the round that made `state`.

  Each is an accounting.CategoryRoundEvents: relation (a), TFF's recorded event (value and
  clipped-count Gaussians, count at sensitivity 0.5) converted by accounting.category_event to
  count sensitivity 1; relation (b), accounting.whole_client_events over every released
  category's recorded event. Frozen categories get None: their inner state was kept, so the event
  in it is an old one. Read from the aggregator state itself, never from the plan.
  """
  if shared_noise.is_shared_noise_state(state):
    return shared_noise.dp_events(state)
  released = released_categories(state)
  recorded = {
      c: (differential_privacy.extract_dp_event_from_state(category_struct.as_dp_state(state[STATE_INNER][c]))
          if c in released else None) for c in categories.CATEGORY_IDS
  }
  whole_client = accounting.whole_client_events(recorded)
  return {
      c: (accounting.CategoryRoundEvents(accounting.category_event(recorded[c]), whole_client[c])
          if c in released else None) for c in categories.CATEGORY_IDS
  }


def clip_norms(state: Any) -> dict[str, float]:
  """Each category's current adaptive clip norm (public: it is a DP output)."""
  if shared_noise.is_shared_noise_state(state):
    return shared_noise.clip_norms(state)
  norms = {}
  for category_id in categories.CATEGORY_IDS:
    dp_state = category_struct.as_dp_state(state[STATE_INNER][category_id])
    # NormalizedQuery(QuantileAdaptiveClipSumQuery) state: numerator_state.sum_state.l2_norm_clip
    numerator = category_struct.field(dp_state.query_state, 'numerator_state')
    sum_state = category_struct.field(numerator, 'sum_state')
    norms[category_id] = float(category_struct.field(sum_state, 'l2_norm_clip'))
  return norms
