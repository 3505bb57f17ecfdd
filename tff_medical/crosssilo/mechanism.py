"""The cross-silo round's privacy math: the simulation's DP queries, applied to a secure sum.

One code path for the math, two runtimes. TFF's DifferentiallyPrivateFactory, which the
simulation uses per category (tff_medical.aggregation.class_aware), is a thin federated wrapper
around one TF Privacy DPQuery: the server calls `derive_sample_params` and broadcasts the
result, each client calls `preprocess_record` (clip to the adaptive norm, plus the centred
"was unclipped" bit), the records are summed, and the server calls `get_noised_result` (Gaussian
noise, adaptive clip update, DP event). Here the very same query objects are built (by
class_aware.category_queries, which the simulation's factory wraps, `category_queries`), and the
same three calls run where they run in TFF: `derive_sample_params` at the coordinator,
`preprocess_record` at each site, `get_noised_result` at the coordinator on the sum that Flower's
SecAgg+ released. Noise, adaptive clipping and the DP event (fed to the ledger through
accounting.category_event, as in the simulation) are therefore identical; only the sum is
computed by a different protocol.

SecAgg+ sums integers, so each site's records are encoded as one float vector in [-1, 1]
(`encode_site_records`). Flower clips every coordinate a site hands it to [-1, 1] and quantizes
it (stochastic rounding, 2**22 levels), so the encoding decides how far a site that sends its
maximum in every coordinate reaches. Per category c: the clipped sub-update divided by C_c
(norm <= 1) is rotated by a random orthogonal map public for the round (`rotate`: random signs,
then the orthonormal Walsh-Hadamard transform, after zero-padding to D, a power of two), and
each rotated coordinate is clipped to [-1/sqrt(D), 1/sqrt(D)] and scaled to [-1, 1]. The box
[-1/sqrt(D), 1/sqrt(D)]**D has radius exactly 1, so whatever a site sends inside Flower's range
decodes to norm <= C_c: at most one honest clipped site. Honest records lose little (a rotated
unit vector has coordinates ~ N(0, 1/D); clipping them at one standard deviation keeps ~0.95
of the direction and ~0.72 of the norm; `influence` measures it). The bit (+-0.5) is sent
as +-1, Flower's whole range, so a site moves the clipped count by at most one honest site's
swing. Every record is first shrunk by the largest rounding error, so that the rounded record
stays within the clip norm the accountant assumes.

The coordinator decodes the sum (`decode_secure_sum`); before the query sees it, it clamps each
rotated coordinate to the range of `max_sites` sites, rotates back, projects each category's sum
onto the ball of radius max_sites * C_c and clamps the bit sum to [-max_sites/2, max_sites/2].
max_sites is the number of enrolled sites, not the sites in this sum, so the maps are the same
for neighbouring inputs; each is 1-Lipschitz, so they keep the sensitivity C_c. These sum-level
maps are all that bounds a site that replaces Flower's SecAgg+ client and adds arbitrary
integers modulo 2**32: the coordinator only ever sees the sum, so such a site can still steer
the round within them (tff_medical.crosssilo.influence measures both cases). Bounding it per site
needs zero-knowledge range proofs on the masked inputs, which Flower 1.12 does not have.
"""

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from tff_medical import categories
from tff_medical.aggregation import class_aware
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration

# SecAgg+ quantization: every encoded coordinate lies in [-CLIPPING_RANGE, CLIPPING_RANGE].
CLIPPING_RANGE = 1.0
QUANTIZATION_RANGE = 2**22  # Flower's default; n sites need n * 2**22 < MODULUS_RANGE.
MODULUS_RANGE = 2**32
# Rotated coordinates are clipped to ROTATED_RANGE / sqrt(D) (in clip-norm units): the most a
# site can send then has norm ROTATED_RANGE clip norms. 1: no more than one honest site.
ROTATED_RANGE = 1.0


@dataclasses.dataclass(frozen=True)
class MechanismPlan:
  """What every party must agree on to run the same queries (public: no data in it)."""

  splits: Mapping[str, calibration.AdaptiveClipSplit]
  clip: class_aware.AdaptiveClipSettings

  def to_json(self) -> str:
    return json.dumps({'splits': {c: self.splits[c].to_json_dict()
                                  for c in categories.CATEGORY_IDS},
                       'clip': dataclasses.asdict(self.clip)}, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> 'MechanismPlan':
    raw = json.loads(text)
    return cls({c: calibration.AdaptiveClipSplit.from_json_dict(raw['splits'][c])
                for c in categories.CATEGORY_IDS},
               class_aware.AdaptiveClipSettings(**raw['clip']))


def category_queries(plan: MechanismPlan) -> dict[str, Any]:
  """Each category's DPQuery, built by the same constructor as the simulation's aggregator.

  class_aware.category_queries is what ClassAwareFactory.dp wraps, so any change in how the
  query is built applies to both runtimes.
  """
  return class_aware.category_queries(plan.splits, plan.clip)


def initial_states(queries: Mapping[str, Any]) -> dict[str, Any]:
  return {c: queries[c].initial_global_state() for c in categories.CATEGORY_IDS}


def flatten_state(state: Any) -> list[float]:
  return [float(np.asarray(t)) for t in tf.nest.flatten(state)]


def unflatten_state(query: Any, flat: Sequence[float]) -> Any:
  template = query.initial_global_state()
  leaves = tf.nest.flatten(template)
  if len(flat) != len(leaves):
    raise PolicyError(f'a query state must have {len(leaves)} numbers. Found {len(flat)}.')
  return tf.nest.pack_sequence_as(
      template, [tf.constant(v, t.dtype) for v, t in zip(flat, leaves)])


def clip_norm(query: Any, state: Any) -> float:
  """The category's current adaptive clip norm (public: it is a DP output)."""
  return float(query.derive_sample_params(state).sum_params)


def sample_params(queries: Mapping[str, Any], states: Mapping[str, Any]) -> dict[str, list[float]]:
  """What the coordinator broadcasts so that sites preprocess as TFF's clients would."""
  return {c: [float(np.asarray(t)) for t in tf.nest.flatten(
      queries[c].derive_sample_params(states[c]))] for c in categories.CATEGORY_IDS}


def _params(query: Any, flat: Sequence[float]) -> Any:
  template = query.derive_sample_params(query.initial_global_state())
  leaves = tf.nest.flatten(template)
  if len(flat) != len(leaves) or not all(math.isfinite(v) for v in flat):
    raise PolicyError(f'sample params must be {len(leaves)} finite numbers. Found {flat!r}.')
  return tf.nest.pack_sequence_as(template, [tf.constant(v, t.dtype)
                                             for v, t in zip(flat, leaves)])


def num_parameters(shapes: Sequence[Sequence[int]]) -> int:
  return int(sum(int(np.prod(s)) for s in shapes))


def padded_length(d: int) -> int:
  """D: the power of two the rotation works in (d zero-padded)."""
  return 1 << max(0, int(d) - 1).bit_length()


def encoded_length(shapes: Sequence[Sequence[int]]) -> int:
  return categories.NUM_CATEGORIES * (padded_length(num_parameters(shapes)) + 1)


def new_rotation_seed() -> int:
  """A round's rotation seed (public: sites and coordinator use it; a site learns nothing it
  could exploit from it, since the bound holds for any rotation)."""
  return int(np.random.default_rng().integers(0, 2**62))


def _walsh_hadamard(x: np.ndarray) -> np.ndarray:
  """Orthonormal Walsh-Hadamard transform of a power-of-two length vector (its own inverse)."""
  y = np.array(x, np.float64)
  n, h = y.shape[0], 1
  while h < n:
    y = y.reshape(-1, 2, h)
    y = np.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1)
    h *= 2
  return y.reshape(n) / math.sqrt(n)


def _signs(seed: int, part: int, size: int) -> np.ndarray:
  return np.random.default_rng([int(seed), int(part)]).choice([-1.0, 1.0], size)


def rotate(flat: np.ndarray, seed: int, part: int = 0) -> np.ndarray:
  """`flat` zero-padded to D and rotated: H diag(signs) x, signs drawn from (seed, part)."""
  padded = np.zeros(padded_length(flat.shape[0]))
  padded[:flat.shape[0]] = flat
  return _walsh_hadamard(padded * _signs(seed, part, padded.shape[0]))


def unrotate(rotated: np.ndarray, seed: int, d: int, part: int = 0) -> np.ndarray:
  """The first d coordinates of rotate's inverse (orthogonal, then a projection: 1-Lipschitz)."""
  return (_walsh_hadamard(rotated) * _signs(seed, part, rotated.shape[0]))[:d]


def rounding_shrink() -> float:
  """Factor keeping a clipped, stochastically rounded record within its clip norm.

  Rounding moves each of the D encoded coordinates by less than one level, 2 / QUANTIZATION_RANGE,
  i.e. 2 ROTATED_RANGE / (sqrt(D) QUANTIZATION_RANGE) clip norms: less than
  2 ROTATED_RANGE / QUANTIZATION_RANGE in norm.
  """
  return 1.0 - 2 * ROTATED_RANGE * CLIPPING_RANGE / QUANTIZATION_RANGE


def encode_unit_vector(flat: np.ndarray, seed: int, part: int = 0) -> np.ndarray:
  """A vector of norm <= 1 as Flower's input: rotated, each coordinate clipped to
  ROTATED_RANGE / sqrt(D) and scaled to [-CLIPPING_RANGE, CLIPPING_RANGE]."""
  rotated = rotate(np.asarray(flat, np.float64) * rounding_shrink(), seed, part)
  scale = math.sqrt(rotated.shape[0]) / ROTATED_RANGE * CLIPPING_RANGE
  return np.clip(rotated * scale, -CLIPPING_RANGE, CLIPPING_RANGE)


def decode_unit_sum(encoded: np.ndarray, seed: int, d: int, max_sites: int,
                    part: int = 0) -> tuple[np.ndarray, bool]:
  """A sum of `encode_unit_vector`s back in unit-vector space, each rotated coordinate first
  clamped to what max_sites sites can send; (sum, whether the clamp acted)."""
  bound = max_sites * CLIPPING_RANGE
  clamped = np.clip(encoded, -bound, bound)
  acted = bool(np.any(clamped != encoded))
  scale = ROTATED_RANGE / math.sqrt(encoded.shape[0]) / CLIPPING_RANGE
  return unrotate(clamped * scale, seed, d, part), acted


def encode_site_records(queries: Mapping[str, Any], params: Mapping[str, Sequence[float]],
                        sub_updates: Sequence[Sequence[np.ndarray]],
                        rotation_seed: int) -> np.ndarray:
  """A site's SecAgg+ input: per category, TF Privacy's record encoded by
  `encode_unit_vector`, then its bit at Flower's full range (+-0.5 sent as +-1).

  Args:
    queries: `category_queries` of the round's plan.
    params: The coordinator's `sample_params` for the round.
    sub_updates: [category][variable] (LocalTrainer's ClientOutput.sub_updates).
    rotation_seed: The round's rotation (from the coordinator's instructions).
  """
  parts = []
  for index, c in enumerate(categories.CATEGORY_IDS):
    update = [np.asarray(v, np.float32) for v in sub_updates[index]]
    if not all(np.all(np.isfinite(v)) for v in update):
      update = [np.zeros_like(v) for v in update]  # As LocalTrainer does: zero is valid.
    query_params = _params(queries[c], params[c])
    record = queries[c].preprocess_record(query_params, update)
    leaves = tf.nest.flatten(record)
    values, bit = leaves[:-1], float(leaves[-1])
    clip = float(query_params.sum_params)
    flat = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in values])
    parts.append(encode_unit_vector(flat / clip, rotation_seed, index))
    parts.append(np.array([2 * bit * CLIPPING_RANGE]))
  return np.concatenate(parts).astype(np.float64)


@dataclasses.dataclass
class DecodedSum:
  """Per category: the summed clipped sub-updates (model units) and the summed bits."""

  values: dict[str, list[np.ndarray]]
  bits: dict[str, float]
  contributors: int
  projected: dict[str, bool]


def decode_secure_sum(vector: np.ndarray, contributors: int, clip_norms: Mapping[str, float],
                      shapes: Sequence[Sequence[int]], rotation_seed: int,
                      max_sites: int) -> DecodedSum:
  """Undoes `encode_site_records` on a sum of `contributors` encodings, with the safety maps
  (sized for `max_sites`, the enrolled sites: see the module docstring).

  Raises:
    PolicyError: if the vector has the wrong length or a non-finite entry (SecAgg+ output is
      integer-derived, so this means a broken protocol: the round must be abandoned).
  """
  vector = np.asarray(vector, np.float64).ravel()
  d = num_parameters(shapes)
  if vector.shape[0] != encoded_length(shapes) or not np.all(np.isfinite(vector)):
    raise PolicyError(f'the secure sum must be {encoded_length(shapes)} finite numbers. Found '
                      f'{vector.shape[0]} numbers, finite: {bool(np.all(np.isfinite(vector)))}.')
  if not 1 <= contributors <= max_sites:
    raise PolicyError(f'contributors must be in [1, max_sites={max_sites}]. '
                      f'Found {contributors}.')
  big_d = padded_length(d)
  values, bits, projected = {}, {}, {}
  for index, c in enumerate(categories.CATEGORY_IDS):
    start = index * (big_d + 1)
    unit_sum, clamped = decode_unit_sum(vector[start:start + big_d], rotation_seed, d,
                                        max_sites, index)
    values[c], projected[c] = _project_and_split(unit_sum * clip_norms[c],
                                                 max_sites * clip_norms[c], shapes)
    projected[c] = projected[c] or clamped
    bits[c] = float(np.clip(vector[start + big_d] / (2 * CLIPPING_RANGE), -0.5 * max_sites,
                            0.5 * max_sites))
  return DecodedSum(values, bits, contributors, projected)


def _project_and_split(flat: np.ndarray, bound: float, shapes: Sequence[Sequence[int]]
                      ) -> tuple[list[np.ndarray], bool]:
  """`flat` projected onto the L2 ball of radius `bound`, as float32 arrays of `shapes`."""
  norm = float(np.linalg.norm(flat))
  projected = norm > bound
  if projected:
    flat = flat * (bound / norm)
  arrays, offset = [], 0
  for shape in shapes:
    size = int(np.prod(shape))
    arrays.append(flat[offset:offset + size].reshape(shape).astype(np.float32))
    offset += size
  return arrays, projected


# Example level (privacy_unit 'example'): a site's update is its DP-SGD model delta, already
# private at the site; the secure sum only needs each one bounded to fit the quantization.


def encode_site_update(update: Sequence[np.ndarray], bound: float,
                       rotation_seed: int) -> np.ndarray:
  """A site's SecAgg+ input at example level: its delta clipped to L2 norm `bound`, over
  `bound`, encoded by `encode_unit_vector` (so no site reaches beyond norm `bound`).

  Clipping a DP-SGD output is post-processing (no privacy cost). A non-finite delta is sent as
  zero.
  """
  bound = accounting.positive('update_l2_bound', bound)
  flat = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in update])
  if not np.all(np.isfinite(flat)):
    flat = np.zeros_like(flat)
  norm = float(np.linalg.norm(flat))
  scale = min(1.0, bound / norm) if norm > 0 else 1.0
  return encode_unit_vector(flat * scale / bound, rotation_seed)


def decode_update_sum(vector: np.ndarray, contributors: int, bound: float,
                      shapes: Sequence[Sequence[int]],
                      rotation_seed: int) -> tuple[list[np.ndarray], bool]:
  """The mean of `contributors` `encode_site_update` vectors from their sum, in model units.

  Each rotated coordinate is clamped to what `contributors` sites can send and the sum is
  projected onto the ball of radius contributors x bound (both 1-Lipschitz); these bound only
  the sum: a site that replaces Flower's client can still steer the mean within them.
  Returns (mean delta per variable, whether a clamp or the projection acted).

  Raises:
    PolicyError: wrong length or a non-finite entry (a broken protocol: abandon the round).
  """
  vector = np.asarray(vector, np.float64).ravel()
  d = num_parameters(shapes)
  if vector.shape[0] != padded_length(d) or not np.all(np.isfinite(vector)):
    raise PolicyError(f'the secure sum must be {padded_length(d)} finite numbers. Found '
                      f'{vector.shape[0]} numbers, finite: {bool(np.all(np.isfinite(vector)))}.')
  if contributors < 1:
    raise PolicyError(f'contributors must be positive. Found {contributors}.')
  unit_sum, clamped = decode_unit_sum(vector, rotation_seed, d, contributors)
  total, projected = _project_and_split(unit_sum * bound, contributors * bound, shapes)
  return [t / np.float32(contributors) for t in total], projected or clamped


@dataclasses.dataclass
class RoundResult:
  """What the coordinator may release after a round: noised, combined, with its DP events."""

  update: list[np.ndarray]
  states: dict[str, Any]
  events: dict[str, Optional[Any]]  # accounting.CategoryRoundEvents per released category


def noised_round(queries: Mapping[str, Any], states: Mapping[str, Any], summed: DecodedSum,
                 released: Sequence[str],
                 combination_weights: Optional[Mapping[str, float]] = None) -> RoundResult:
  """get_noised_result per released category on the secure sum, combined as the simulation does.

  A frozen category keeps its state and yields no event, as in ClassAwareFactory.
  """
  weights = combination_weights or {c: 1.0 for c in categories.CATEGORY_IDS}
  new_states, events, update = dict(states), {}, None
  for c in categories.CATEGORY_IDS:
    if c not in released:
      events[c] = None
      continue
    template = queries[c].initial_sample_state(summed.values[c])
    leaves = tf.nest.flatten(template)
    sample_state = tf.nest.pack_sequence_as(
        template, [tf.constant(v, t.dtype) for v, t in
                   zip(list(summed.values[c]) + [summed.bits[c]], leaves)])
    result, new_states[c], events[c] = queries[c].get_noised_result(sample_state, states[c])
    part = [float(weights[c]) * np.asarray(r, np.float32) for r in tf.nest.flatten(result)]
    update = part if update is None else [u + p for u, p in zip(update, part)]
  if update is None:
    update = [np.zeros_like(v) for v in summed.values[categories.CATEGORY_IDS[0]]]
  # Both relations per category, as the simulation's class_aware.dp_events reports them.
  whole_client = accounting.whole_client_events(events)
  events = {c: None if e is None else accounting.CategoryRoundEvents(
      accounting.category_event(e), whole_client[c]) for c, e in events.items()}
  return RoundResult(update, new_states, events)


class ServerOptimizer:
  """TFF's server optimizer, applied eagerly to the released update (as the finalizer does)."""

  def __init__(self, optimizer, weights: Sequence[np.ndarray]):
    self._optimizer = optimizer
    self._specs = tuple(tf.TensorSpec(np.shape(w), tf.float32) for w in weights)
    self.state = optimizer.initialize(self._specs)

  def flat_state(self) -> list[np.ndarray]:
    return [np.asarray(t) for t in tf.nest.flatten(self.state)]

  def load_flat_state(self, flat: Sequence[np.ndarray]) -> None:
    template = self._optimizer.initialize(self._specs)
    leaves = tf.nest.flatten(template)
    self.state = tf.nest.pack_sequence_as(
        template, [tf.constant(np.asarray(v), tf.as_dtype(np.asarray(t).dtype))
                   for v, t in zip(flat, leaves)])

  def apply(self, weights: Sequence[np.ndarray], update: Sequence[np.ndarray]
            ) -> list[np.ndarray]:
    self.state, new = self._optimizer.next(
        self.state, tuple(tf.constant(w, tf.float32) for w in weights),
        tuple(tf.constant(u, tf.float32) for u in update))
    return [np.asarray(w) for w in new]
