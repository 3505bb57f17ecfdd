"""Class-aware aggregation: one (DP) sub-aggregator per image category, one combined update.

A client's update arrives as a struct with one sub-update per category (see
tff_medical.training.client_work). Category c's sub-updates are aggregated by their own inner
factory: for DP, TFF's DifferentiallyPrivateFactory.gaussian_adaptive with c's noise multiplier,
so category-c data influences only sub-aggregate c and c's budget governs its noise. TFF's
noise split and DP event assume the clipped count's sensitivity of a whole client; ours is per
category (see tff_medical.privacy.accounting), so `dp` and `dp_events` translate both ways. The
server then adds the released sub-aggregates, weighted, into one model update; that is
post-processing and costs no privacy.

Freezing: the aggregator state carries a 0/1 `released` flag per category, set by the training
loop from the privacy ledger before each round (`with_released_categories`). For a frozen
category the sub-aggregate is multiplied by zero and its inner state (adaptive clip norm, DP
event) is kept as it was, so nothing computed from that round's category-c data leaves the
aggregator and the ledger records no event for it.
"""

import collections
from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import differential_privacy

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration

STATE_INNER = 'inner'
STATE_RELEASED = 'released'


@dataclasses.dataclass(frozen=True)
class AdaptiveClipSettings:
  """Adaptive clipping (Andrew et al. 2021) settings shared by every category's aggregator.

  Defaults follow TFF's gaussian_adaptive: start small, adapt geometrically to the median norm.
  """

  initial_l2_norm_clip: float = 0.1
  target_unclipped_quantile: float = 0.5
  learning_rate: float = 0.2

  def __post_init__(self):
    if not (math.isfinite(self.initial_l2_norm_clip) and self.initial_l2_norm_clip > 0):
      raise PolicyError('initial_l2_norm_clip must be positive. '
                        f'Found {self.initial_l2_norm_clip!r}.')
    if not 0 <= self.target_unclipped_quantile <= 1:
      raise PolicyError('target_unclipped_quantile must be in [0, 1]. '
                        f'Found {self.target_unclipped_quantile!r}.')
    if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
      raise PolicyError(f'learning_rate must be non-negative. Found {self.learning_rate!r}.')


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
    weights = combination_weights or {c: 1.0 for c in categories.CATEGORY_IDS}
    if list(weights) != list(categories.CATEGORY_IDS) or not all(
        math.isfinite(w) and w >= 0 for w in weights.values()):
      raise PolicyError('combination_weights must give a non-negative weight to each category '
                        f'in order. Found {dict(weights)!r}.')
    self._factories = dict(category_factories)
    self._weights = np.array([weights[c] for c in categories.CATEGORY_IDS], np.float32)
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
    # Any key order: a plan read back from JSON may have sorted keys.
    if not isinstance(splits, Mapping) or set(splits) != set(categories.CATEGORY_IDS):
      found = sorted(map(str, splits)) if isinstance(splits, Mapping) else splits
      raise PolicyError(f'splits must map each of {list(categories.CATEGORY_IDS)} to an '
                        f'AdaptiveClipSplit. Found {found!r}.')
    for category_id in categories.CATEGORY_IDS:
      if not isinstance(splits[category_id], calibration.AdaptiveClipSplit):
        raise PolicyError(f'splits[{category_id}] must be an AdaptiveClipSplit. '
                          f'Found {splits[category_id]!r}.')
    clients = {c: splits[c].expected_clients_per_round for c in categories.CATEGORY_IDS}
    if len(set(clients.values())) != 1:
      raise PolicyError('splits must all have the same expected_clients_per_round (one client '
                        f'sample serves every category). Found {clients}.')
    factories = collections.OrderedDict()
    for category_id in categories.CATEGORY_IDS:
      split = splits[category_id]
      factories[category_id] = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
          noise_multiplier=float(split.tff_noise_multiplier),
          clients_per_round=float(split.expected_clients_per_round),
          initial_l2_norm_clip=float(clip.initial_l2_norm_clip),
          target_unclipped_quantile=float(clip.target_unclipped_quantile),
          learning_rate=float(clip.learning_rate),
          clipped_count_stddev=float(split.clipped_count_stddev))
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
    from tff_medical.aggregation import shared_noise  # pylint: disable=g-import-not-at-top
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
      results = _to_nest(results)
      parts = [tf.nest.map_structure(lambda t, s=scale[i]: tf.cast(s, t.dtype) * t, results[c])
               for i, c in enumerate(categories.CATEGORY_IDS)]
      return tf.nest.map_structure(lambda *ts: tf.add_n(ts), *parts)

    def make_keep_if_frozen(index, inner_state_type):
      # A frozen category keeps its old inner state: its clip norm and DP event must not move
      # with data that was never released.
      @tff.tensorflow.computation(inner_state_type, inner_state_type, released_type)
      def keep_if_frozen(old_state, new_state, released):
        keep_new = released[index] > 0.5
        return tf.nest.map_structure(lambda o, n: tf.where(keep_new, n, o), _to_nest(old_state),
                                     _to_nest(new_state))

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
      combined = tff.federated_map(combine, (tff.federated_zip(results), released))
      new_state = tff.federated_zip(collections.OrderedDict([
          (STATE_INNER, tff.federated_zip(new_inner)), (STATE_RELEASED, released)]))
      return tff.templates.MeasuredProcessOutput(
          state=new_state, result=combined, measurements=tff.federated_zip(measurements))

    return tff.templates.AggregationProcess(init_fn, next_fn)


def check_category_struct(value_type) -> tff.Type:
  """The sub-update type of a {category: sub-update} struct; TypeError for any other type."""
  if not isinstance(value_type, tff.StructType) or [
      name for name, _ in tff.structure.iter_elements(value_type)
  ] != list(categories.CATEGORY_IDS):
    raise TypeError(f'value_type must be a struct with one field per category '
                    f'{list(categories.CATEGORY_IDS)}. Found {value_type}.')
  update_type = value_type[categories.CATEGORY_IDS[0]]
  for category_id in categories.CATEGORY_IDS:
    if not value_type[category_id].is_equivalent_to(update_type):
      raise TypeError(f'every category sub-update must have type {update_type}. '
                      f'Found {value_type[category_id]} for {category_id}.')
  return update_type


def with_released_categories(state: Any, released: Sequence[str]) -> Any:
  """The aggregator state with exactly the categories in `released` active for the next round."""
  unknown = [c for c in released if c not in categories.LABEL_OF]
  if unknown:
    raise PolicyError(f'released categories must be known category ids. Found {unknown}.')
  mask = np.array([1.0 if c in released else 0.0 for c in categories.CATEGORY_IDS], np.float32)
  new_state = collections.OrderedDict(state)
  new_state[STATE_RELEASED] = mask
  return new_state


def released_categories(state: Any) -> tuple[str, ...]:
  mask = np.asarray(state[STATE_RELEASED])
  return tuple(c for i, c in enumerate(categories.CATEGORY_IDS) if mask[i] > 0.5)


def dp_events(state: Any) -> dict[str, Any]:
  """The DP events each released category's mechanism applied in the round that made `state`.

  Each is an accounting.CategoryRoundEvents: relation (a), TFF's recorded event (value and
  clipped-count Gaussians, count at sensitivity 0.5) converted by accounting.category_event to
  count sensitivity 1; relation (b), accounting.whole_client_events over every released
  category's recorded event. Frozen categories get None: their inner state was kept, so the event
  in it is an old one. Read from the aggregator state itself, never from the plan.
  """
  from tff_medical.aggregation import shared_noise  # pylint: disable=g-import-not-at-top
  if shared_noise.is_shared_noise_state(state):
    return shared_noise.dp_events(state)
  released = released_categories(state)
  recorded = {
      c: (differential_privacy.extract_dp_event_from_state(_as_dp_state(state[STATE_INNER][c]))
          if c in released else None) for c in categories.CATEGORY_IDS
  }
  whole_client = accounting.whole_client_events(recorded)
  return {
      c: (accounting.CategoryRoundEvents(accounting.category_event(recorded[c]), whole_client[c])
          if c in released else None) for c in categories.CATEGORY_IDS
  }


def clip_norms(state: Any) -> dict[str, float]:
  """Each category's current adaptive clip norm (public: it is a DP output)."""
  from tff_medical.aggregation import shared_noise  # pylint: disable=g-import-not-at-top
  if shared_noise.is_shared_noise_state(state):
    return shared_noise.clip_norms(state)
  norms = {}
  for category_id in categories.CATEGORY_IDS:
    dp_state = _as_dp_state(state[STATE_INNER][category_id])
    # NormalizedQuery(QuantileAdaptiveClipSumQuery) state: numerator_state.sum_state.l2_norm_clip
    numerator = _field(dp_state.query_state, 'numerator_state')
    sum_state = _field(numerator, 'sum_state')
    norms[category_id] = float(_field(sum_state, 'l2_norm_clip'))
  return norms


def _to_nest(value):
  """A TFF Struct (what a tf_computation receives for a struct argument) as tf.nest sees it."""
  if isinstance(value, tff.structure.Struct):
    return tff.structure.to_odict_or_tuple(value, recursive=True)
  return value


def _field(value, name):
  if isinstance(value, Mapping):
    return value[name]
  return getattr(value, name)


def _as_dp_state(value) -> differential_privacy.DPAggregatorState:
  if isinstance(value, differential_privacy.DPAggregatorState):
    return value
  if isinstance(value, Mapping):
    return differential_privacy.DPAggregatorState(**value)
  return differential_privacy.DPAggregatorState(*value)
