"""Noise calibration: each category's multiplier for its budget, and its adaptive-clip split.

The derivations (count sensitivity, the two relations, why TFF's multiplier differs) are in
docs/PRIVACY.md.
"""
import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional, Union

import dp_accounting

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy.accounting import Accountant
from tff_medical.privacy.accounting import positive
from tff_medical.privacy.accounting import Relation
from tff_medical.privacy.policy import PrivacyPolicy
from tff_medical.privacy.sampling import SamplingSpec

# TFF keeps noise multipliers and clip norms in float32, so the multiplier it reports back can be
# a few float32 ulps (~1e-7 relative) below the planned one. Calibrated multipliers are raised by
# this much so that the planned number of rounds still fits the budget exactly.
CALIBRATION_MARGIN = 1e-5

# TFF's default clipped-count noise, as a fraction of the expected clients per round
# (DifferentiallyPrivateFactory.gaussian_adaptive; Andrew et al. recommend m / 20).
TFF_DEFAULT_COUNT_NOISE_FRACTION = 0.05


def calibrate_noise_multiplier(target_epsilon: float,
                               delta: float,
                               rounds: int,
                               sampling: SamplingSpec,
                               accountant: Union[Accountant, str] = Accountant.RDP,
                               earlier: accounting.EventsArg = ()) -> float:
  """Smallest z (within 1e-6, plus CALIBRATION_MARGIN) meeting (target_epsilon, delta).

  Calibrates `rounds` rounds of `round_event(z, sampling)`, after the `earlier` events (what
  earlier runs released from the same data), with dp_accounting.calibrate_dp_mechanism. The
  result is the effective multiplier the accountant is fed; with adaptive clipping it is split
  by `category_splits`.
  """
  target_epsilon = positive('target_epsilon', target_epsilon)
  delta = accounting.probability('delta', delta)
  rounds = accounting.positive_int('rounds', rounds)
  accountant = accounting.check_sampling_accountant(sampling, accountant)
  earlier = list(earlier)

  def make_event(z):
    new_rounds = dp_accounting.SelfComposedDpEvent(accounting.round_event(z, sampling), rounds)
    if not earlier:
      return new_rounds
    return dp_accounting.ComposedDpEvent([accounting.as_composed(earlier), new_rounds])

  if earlier:
    already = accounting.epsilon(earlier, delta, accountant)
    if already >= target_epsilon:
      raise PolicyError(f'target_epsilon must exceed what earlier runs on the same data spent. '
                        f'Found {target_epsilon:g}, already spent {already:.4g}.')

  def calibrate(kind, bracket):
    try:
      return float(
          dp_accounting.calibrate_dp_mechanism(
              lambda: accounting.make_accountant(kind, sampling.method), make_event,
              target_epsilon, delta, bracket))
    except (dp_accounting.mechanism_calibration.NoBracketIntervalFoundError,
            dp_accounting.mechanism_calibration.NoOptimumFoundError, ValueError) as e:
      raise PolicyError(
          f'target_epsilon must be reachable with a noise multiplier in [0.001, 1e9]. Found '
          f'{target_epsilon} at delta {delta}, {rounds} rounds, rate {sampling.rate:.6g}: {e}'
      ) from None

  z = calibrate(Accountant.RDP, dp_accounting.LowerEndpointAndGuess(1e-3, 1.0))
  if accountant is Accountant.PLD:
    # PLD on a small multiplier needs a huge grid (tens of GiB near z = 0.1), so no blind search
    # from 0: RDP's z (RDP bounds PLD's epsilon from above) brackets PLD's z from above.
    def gap(z):
      return accounting.epsilon((make_event(z), 1), delta, Accountant.PLD) - target_epsilon

    upper = z
    while gap(upper) > 0:
      upper *= 1.25
    lower = upper
    for _ in range(10):
      lower *= 0.8
      if gap(lower) > 0:
        break
    else:
      raise PolicyError(f'target_epsilon must be reachable by PLD within a factor 10 of RDP\'s '
                        f'noise multiplier ({z:.6g}). Found {target_epsilon}.')
    z = calibrate(Accountant.PLD, dp_accounting.ExplicitBracketInterval(lower, upper))
  return z * (1 + CALIBRATION_MARGIN)


def calibrate_category_noise(policy: PrivacyPolicy,
                             sampling: SamplingSpec,
                             rounds: int,
                             accountant: Union[Accountant, str] = Accountant.RDP,
                             earlier: Optional[Mapping[str, Mapping[Relation, list]]] = None
                            ) -> dict[str, float]:
  """Each category's effective noise multiplier for its budget over `rounds` rounds.

  Args:
    earlier: Optional {category: {Relation: [(DpEvent, count), ...]}}: what earlier runs on the
      same data released; each category's z then fits what is left under every relation.

  Returns:
    {category id: z}, in CATEGORY_IDS order.
  """
  if not isinstance(policy, PrivacyPolicy):
    raise PolicyError(f'policy must be a PrivacyPolicy. Found {policy!r}.')
  by_epsilon: dict[float, float] = {}
  result = {}
  for category_id in categories.CATEGORY_IDS:
    target = policy.budget(category_id).epsilon
    spent_before = {r: e for r, e in ((earlier or {}).get(category_id) or {}).items() if e}
    if spent_before:
      try:
        result[category_id] = max(
            calibrate_noise_multiplier(target, policy.delta, rounds, sampling, accountant, e)
            for e in spent_before.values())
      except PolicyError as e:
        raise PolicyError(f'{category_id}: {e}') from None
      continue
    if target not in by_epsilon:
      by_epsilon[target] = calibrate_noise_multiplier(target, policy.delta, rounds, sampling,
                                                      accountant)
    result[category_id] = by_epsilon[target]
  return result


# Adaptive clipping: how the effective multiplier z is spent between values and count.

# Relative tolerance for a split's derived fields: they are recomputed by the same formulas, so
# only a plan from another version (or a hand-edited one) differs.
_SPLIT_TOLERANCE = 1e-9


def split_noise_multiplier(noise_multiplier: float,
                           clipped_count_stddev: float,
                           other_counts_inverse_square: float = 0.0) -> tuple[float, float]:
  """(value noise multiplier, count noise multiplier) at effective multiplier z and count stddev s.

  Relation (a): the clipped count has sensitivity 1 (docs/PRIVACY.md), so its multiplier is s,
  not TFF's 2 s, and needs 1 / z_v**2 + 1 / s**2 <= 1 / z**2 (so s > z: stricter than TFF's own
  check z < 2 s). Relation (b): 1 / z_v**2 + 1 / (2 s)**2 + o <= 1 / z**2, with o the sum of
  1 / (2 s_d)**2 over the other categories' counts. z_v is the smallest meeting both.
  """
  z = positive('noise_multiplier', noise_multiplier)
  s = positive('clipped_count_stddev', clipped_count_stddev)
  others = float(other_counts_inverse_square)
  if not others >= 0 or not math.isfinite(others):
    raise PolicyError(f'other_counts_inverse_square must be non-negative. Found {others!r}.')
  if z >= s:
    raise PolicyError(f'clipped_count_stddev must be more than noise_multiplier ({z:.6g}): the '
                      f'per-category clipped count has sensitivity 1. Found {s:.6g}.')
  counts = max(s**-2, (2 * s)**-2 + others)
  if counts >= z**-2:
    raise PolicyError(
        f'noise_multiplier must leave room for the clipped counts that move when a whole client '
        f'is added or removed: 1/z**2 must exceed {counts:.6g}. Found z={z:.6g}.')
  return (z**-2 - counts)**-0.5, s


def tff_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float,
                         other_counts_inverse_square: float = 0.0) -> float:
  """The noise_multiplier to pass to TFF's gaussian_adaptive so that its values get our z_v.

  TFF derives z_v = (z_tff**-2 - (2 s)**-2)**-0.5 (sensitivity 0.5 on the count), so
  z_tff = (z_v**-2 + (2 s)**-2)**-0.5 (< 2 s when s > z).
  """
  value_multiplier, _ = split_noise_multiplier(noise_multiplier, clipped_count_stddev,
                                               other_counts_inverse_square)
  return (value_multiplier**-2 + (2 * float(clipped_count_stddev))**-2)**-0.5


@dataclasses.dataclass(frozen=True)
class AdaptiveClipSplit:
  """How a category's effective multiplier z is split between its value and count noise.

  Build with `adaptive_clip_split` or `choose_clipped_count_stddev`; the derived fields are
  checked on construction, so a split from an older plan (count multiplier 2 s) is refused.

  Attributes:
    noise_multiplier: z, the true effective multiplier the accountant is fed.
    expected_clients_per_round: m, passed to gaussian_adaptive as clients_per_round.
    clipped_count_stddev: s, stddev of the noise on the clipped count (pass to TFF).
    value_noise_multiplier: z_v = (z**-2 - s**-2)**-0.5, noise stddev / clip on the values.
    count_noise_multiplier: s: the per-category count's sensitivity is 1 (records move from
      -0.5 to +0.5 when a client's category data is removed).
    tff_noise_multiplier: What to pass to gaussian_adaptive as noise_multiplier: TFF assumes
      count sensitivity 0.5, so it must be given (z_v**-2 + (2 s)**-2)**-0.5 to apply our z_v.
    inflation: z_v / z, how much more value noise than z the values get.
    other_counts_inverse_square: o = sum of 1 / (2 s_d)**2 over the other categories' counts,
      which relation (b) adds to this category's round (0 in plans from before relation (b)).
  """

  noise_multiplier: float
  expected_clients_per_round: float
  clipped_count_stddev: float
  value_noise_multiplier: float
  count_noise_multiplier: float
  tff_noise_multiplier: float
  inflation: float
  other_counts_inverse_square: float = 0.0

  def __post_init__(self):
    expected = _split_fields(self.noise_multiplier, self.expected_clients_per_round,
                             self.clipped_count_stddev, self.other_counts_inverse_square)
    for field in ('value_noise_multiplier', 'count_noise_multiplier', 'tff_noise_multiplier',
                  'inflation'):
      value, want = getattr(self, field), expected[field]
      if (isinstance(value, bool) or not isinstance(value, numbers.Real) or
          not math.isclose(value, want, rel_tol=_SPLIT_TOLERANCE)):
        raise PolicyError(f'AdaptiveClipSplit.{field} must be {want!r} for noise_multiplier '
                          f'{self.noise_multiplier!r} and clipped_count_stddev '
                          f'{self.clipped_count_stddev!r}. Found {value!r}.')

  @property
  def count_noise_fraction(self) -> float:
    """s / m: stddev of the noise on the estimated unclipped fraction."""
    return self.clipped_count_stddev / self.expected_clients_per_round

  @property
  def whole_client_noise_multiplier(self) -> float:
    """The planned round's multiplier under relation (b): value, own and other counts at 0.5."""
    return (self.value_noise_multiplier**-2 + (2 * self.clipped_count_stddev)**-2 +
            self.other_counts_inverse_square)**-0.5

  def to_json_dict(self) -> dict[str, float]:
    return dict(dataclasses.asdict(self), count_noise_fraction=self.count_noise_fraction)

  @classmethod
  def from_json_dict(cls, value: Mapping[str, Any]) -> 'AdaptiveClipSplit':
    """The inverse of `to_json_dict`; refuses missing, unknown or inconsistent fields."""
    fields = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(value, Mapping):
      raise PolicyError(f'AdaptiveClipSplit JSON must be an object. Found {value!r}.')
    # Plans written before relation (b) have no other_counts_inverse_square: it was 0.
    value = dict({'other_counts_inverse_square': 0.0}, **value)
    missing = [k for k in fields if k not in value]
    unknown = sorted(str(k) for k in value if k not in fields and k != 'count_noise_fraction')
    if missing or unknown:
      raise PolicyError(f'AdaptiveClipSplit JSON must have the keys {", ".join(fields)}. Found '
                        f'missing {missing} and unknown {unknown}.')
    split = cls(**{k: value[k] for k in fields})
    fraction = value.get('count_noise_fraction', split.count_noise_fraction)
    if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or
        not math.isclose(fraction, split.count_noise_fraction, rel_tol=_SPLIT_TOLERANCE)):
      raise PolicyError(f'AdaptiveClipSplit JSON count_noise_fraction must be '
                        f'{split.count_noise_fraction!r}. Found {fraction!r}.')
    return split


def _split_fields(noise_multiplier: float, expected_clients_per_round: float,
                  clipped_count_stddev: float,
                  other_counts_inverse_square: float = 0.0) -> dict[str, float]:
  z = positive('noise_multiplier', noise_multiplier)
  m = positive('expected_clients_per_round', expected_clients_per_round)
  s = positive('clipped_count_stddev', clipped_count_stddev)
  value_multiplier, count_multiplier = split_noise_multiplier(z, s, other_counts_inverse_square)
  return dict(
      noise_multiplier=z,
      expected_clients_per_round=m,
      clipped_count_stddev=s,
      value_noise_multiplier=value_multiplier,
      count_noise_multiplier=count_multiplier,
      tff_noise_multiplier=tff_noise_multiplier(z, s, other_counts_inverse_square),
      inflation=value_multiplier / z,
      other_counts_inverse_square=float(other_counts_inverse_square))


def adaptive_clip_split(noise_multiplier: float,
                        expected_clients_per_round: float,
                        clipped_count_stddev: float,
                        other_counts_inverse_square: float = 0.0) -> AdaptiveClipSplit:
  """The split of effective multiplier z at clipped-count stddev s (needs s > z)."""
  return AdaptiveClipSplit(**_split_fields(noise_multiplier, expected_clients_per_round,
                                           clipped_count_stddev, other_counts_inverse_square))


def choose_clipped_count_stddev(noise_multiplier: float,
                                expected_clients_per_round: float,
                                max_value_noise_inflation: float = 1.05,
                                max_count_noise_fraction: float = 0.1) -> AdaptiveClipSplit:
  """Picks the clipped-count stddev s for TFF's gaussian_adaptive at effective multiplier z.

  TFF's default s = 0.05 m is kept when the value noise stays within
  `max_value_noise_inflation` of z; otherwise the smallest s that does. With the per-category
  count multiplier s (sensitivity 1, see `split_noise_multiplier`):
  z_v / z = (1 - (z / s)**2)**-0.5 <= I  <=>  s >= z / sqrt(1 - I**-2)  (~3.28 z for 1.05).

  s / m is the stddev of the noise on the estimated unclipped fraction b, which drives the clip:
  log C <- log C - lr (b - target) with lr = 0.2. The default bound 0.1 is twice what Andrew et
  al. recommend (m / 20, TFF's default): a round's estimate is then within +-0.2 of b (2 sigma)
  and the clip jitters by ~2% a round, while the signal |b - target| is at most 0.5 and
  typically 0.1-0.3 when the clip is off by 2x. Beyond that the count is mostly noise and the
  clip wanders, so we refuse rather than run a clip that does not track the quantile.

  Args:
    noise_multiplier: z, the calibrated effective multiplier.
    expected_clients_per_round: m (gaussian_adaptive's clients_per_round).
    max_value_noise_inflation: Largest acceptable z_v / z; > 1.
    max_count_noise_fraction: Largest acceptable s / m; > 0.

  Returns:
    The split: pass its tff_noise_multiplier and clipped_count_stddev to TFF.

  Raises:
    PolicyError: if the needed s exceeds max_count_noise_fraction * m, naming the clients per
      round that would suffice and the largest z that fits the current m.
  """
  z = positive('noise_multiplier', noise_multiplier)
  m = positive('expected_clients_per_round', expected_clients_per_round)
  inflation_bound = positive('max_value_noise_inflation', max_value_noise_inflation)
  if inflation_bound <= 1:
    raise PolicyError(f'max_value_noise_inflation must be greater than 1. '
                      f'Found {max_value_noise_inflation!r}.')
  fraction_bound = positive('max_count_noise_fraction', max_count_noise_fraction)
  # Smallest s with z_v / z <= bound; the tiny factor keeps rounding on the safe side.
  headroom = math.sqrt(1 - inflation_bound**-2)
  minimal_stddev = z / headroom * (1 + 1e-9)
  stddev = max(TFF_DEFAULT_COUNT_NOISE_FRACTION * m, minimal_stddev)
  if stddev > fraction_bound * m:
    needed_clients = math.ceil(minimal_stddev / fraction_bound)
    largest_z = fraction_bound * m * headroom
    raise PolicyError(
        f'clipped_count_stddev must be at most {fraction_bound:g} of the clients per round '
        f'({fraction_bound * m:.4g} for {m:g} clients) for the clipped count to be more signal '
        f'than noise. Found {stddev:.4g} ({stddev / m:.3g} of {m:g}), needed to keep the value '
        f'noise within {inflation_bound:g}x of noise_multiplier {z:.4g}. Use at least '
        f'{needed_clients} clients per round, or fewer rounds or a larger epsilon so that the '
        f'noise multiplier is at most {largest_z:.4g}, or allow more value noise '
        f'(max_value_noise_inflation).')
  return adaptive_clip_split(z, m, stddev)


def check_category_splits(splits: Any) -> None:
  """PolicyError unless `splits` maps each category (any key order) to an AdaptiveClipSplit."""
  # Any key order: a plan read back from JSON may have sorted keys.
  if not isinstance(splits, Mapping) or set(splits) != set(categories.CATEGORY_IDS):
    found = sorted(map(str, splits)) if isinstance(splits, Mapping) else splits
    raise PolicyError(f'splits must map each of {list(categories.CATEGORY_IDS)} to an '
                      f'AdaptiveClipSplit. Found {found!r}.')
  for c in categories.CATEGORY_IDS:
    if not isinstance(splits[c], AdaptiveClipSplit):
      raise PolicyError(f'splits[{c}] must be an AdaptiveClipSplit. Found {splits[c]!r}.')


def category_splits(noise_multipliers: Mapping[str, float],
                    expected_clients_per_round: float,
                    max_value_noise_inflation: float = 1.05,
                    max_count_noise_fraction: float = 0.1) -> dict[str, AdaptiveClipSplit]:
  """Each category's split of its z, meeting both relations, in CATEGORY_IDS order.

  Starts from `choose_clipped_count_stddev` (relation (a)); relation (b) then adds the other
  categories' counts to each round, which the value noise absorbs. Where that takes a category's
  value noise past `max_value_noise_inflation`, every count stddev grows (less count signal per
  category, more room for the values) up to `max_count_noise_fraction` of m; beyond it, refused.
  """
  kwargs = dict(max_value_noise_inflation=max_value_noise_inflation,
                max_count_noise_fraction=max_count_noise_fraction)
  zs = {c: noise_multipliers[c] for c in categories.CATEGORY_IDS}
  m = positive('expected_clients_per_round', expected_clients_per_round)
  stddevs = {c: choose_clipped_count_stddev(zs[c], m, **kwargs).clipped_count_stddev
             for c in categories.CATEGORY_IDS}
  ceiling = max_count_noise_fraction * m
  while True:
    total = sum((2 * s)**-2 for s in stddevs.values())
    try:
      splits = {c: adaptive_clip_split(zs[c], m, stddevs[c], total - (2 * stddevs[c])**-2)
                for c in categories.CATEGORY_IDS}
      worst = max(splits.values(), key=lambda split: split.inflation)
      if worst.inflation <= max_value_noise_inflation:
        return splits
      problem = f'value noise {worst.inflation:.4g}x noise_multiplier {worst.noise_multiplier:.4g}'
    except PolicyError as e:
      problem = str(e)
    if all(s >= ceiling for s in stddevs.values()):
      raise PolicyError(
          'noise_multiplier must leave room for both relations at clipped_count_stddev up to '
          f'{max_count_noise_fraction:g} of {m:g} clients per round. Found {problem}. Use more '
          'clients per round, fewer rounds or larger budgets, or allow more value noise '
          '(max_value_noise_inflation).')
    stddevs = {c: min(s * 1.1, ceiling) for c, s in stddevs.items()}
