"""What both class-aware aggregators share: the {category: sub-update} shape, its state, clips.

ClassAwareFactory (class_aware.py) and SharedNoiseFactory (shared_noise.py) both import this
module, so neither imports the other's internals.
"""

import collections
from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any, Optional

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import differential_privacy

from tff_medical import categories
from tff_medical.errors import PolicyError

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


def combination_weight_vector(combination_weights: Optional[Mapping[str, float]]) -> np.ndarray:
  """Each category's weight in the combined update, in category order (default: all 1).

  Raises:
    PolicyError: a category missing, out of order, negative or not finite.
  """
  weights = combination_weights or {c: 1.0 for c in categories.CATEGORY_IDS}
  if list(weights) != list(categories.CATEGORY_IDS) or not all(
      math.isfinite(w) and w >= 0 for w in weights.values()):
    raise PolicyError('combination_weights must give a non-negative weight to each category '
                      f'in order. Found {dict(weights)!r}.')
  return np.array([weights[c] for c in categories.CATEGORY_IDS], np.float32)


def round_output(new_inner, results, measurements, combine, released
                 ) -> tff.templates.MeasuredProcessOutput:
  """A class-aware aggregation's round (inside its federated computation): the categories'
  states, their combined update and their measurements."""
  combined = tff.federated_map(combine, (tff.federated_zip(results), released))
  new_state = tff.federated_zip(collections.OrderedDict([
      (STATE_INNER, tff.federated_zip(new_inner)), (STATE_RELEASED, released)]))
  return tff.templates.MeasuredProcessOutput(
      state=new_state, result=combined, measurements=tff.federated_zip(measurements))


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


def to_nest(value):
  """A TFF Struct (what a tf_computation receives for a struct argument) as tf.nest sees it."""
  if isinstance(value, tff.structure.Struct):
    return tff.structure.to_odict_or_tuple(value, recursive=True)
  return value


def field(value, name):
  """A named field of a state read back as a mapping or as a namedtuple."""
  if isinstance(value, Mapping):
    return value[name]
  return getattr(value, name)


def as_dp_state(value) -> differential_privacy.DPAggregatorState:
  """A DifferentiallyPrivateFactory state, however TFF handed it back."""
  if isinstance(value, differential_privacy.DPAggregatorState):
    return value
  if isinstance(value, Mapping):
    return differential_privacy.DPAggregatorState(**value)
  return differential_privacy.DPAggregatorState(*value)
