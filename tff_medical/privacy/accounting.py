"""Privacy accounting and noise calibration, all through dp_accounting.

Epsilon is never computed by a formula here: every figure comes from dp_accounting's
accountants and their epsilon conversion. What this module adds is the mapping from our
mechanism to DpEvents:

* A round releases, per category, the noised clipped sum and the noised clipped count of the
  adaptive-clipping query (TF Privacy's QuantileAdaptiveClipSumQuery). That is a composition of
  Gaussian mechanisms on the same sampled clients, which is exactly one Gaussian mechanism with
  1 / z**2 = sum_i 1 / z_i**2. dp_accounting's RDP accountant applies the same rule inside a
  sampled event, but (0.4.3) silently keeps only the first Gaussian when its multiplier is a
  numpy float32, which is what TFF reports; its PLD accountant wants a single Gaussian. So we
  always collapse first (`effective_noise_multiplier`, `round_event`).
* Per-category count sensitivity. TFF records the count as Gaussian(2 s) (s = clipped-count
  stddev), i.e. sensitivity 0.5: right for adding or removing a whole client, whose record is
  +-0.5. Our promise is about removing one client's category-c examples while the client stays:
  it is still sampled and sends a zero sub-update for c, which counts as unclipped (+0.5), so
  its record can move from -0.5 to +0.5, sensitivity 1. As 0.5 - record is in {0, 1} and 0 for
  a client without c data, as for an absent one, we account the round as Poisson add/remove with
  count multiplier s (`category_event`, `split_noise_multiplier`). The 0.5 per sampled client
  that this rewrite drops follows the client's sampling, so this is not a formal reduction;
  tests/test_accounting.py checks numerically that the true one-round pair is dominated.
* Two relations per category (`Relation`): (a) removing one client's category-c examples while
  the client stays (above), and (b) adding or removing a whole client whose only examples are
  category c. Under (b) the client's record is +-0.5 in EVERY released category's clipped count
  (its other sub-updates are zero, counted as unclipped), so c's round is c's value Gaussian
  composed with all released counts at sensitivity 0.5 (`whole_client_events`). Calibration
  (`category_splits`) sizes the value noise so that both stay within the budget.
* Poisson sampling is accounted as PoissonSampledDpEvent(q, Gaussian(z)) under add-or-remove-one.
* A fixed-size sample is accounted as SampledWithoutReplacementDpEvent(N, m, Gaussian(z / 2))
  under replace-one: replacing a client moves a clipped sum by up to 2C, and dp_accounting 0.4.3
  feeds the event's multiplier straight into a bound normalized by that sensitivity
  (google/differential-privacy issue #378), so the multiplier must be halved to be sound.
  dp_accounting's PLD accountant does not support sampling without replacement.
"""
import dataclasses
import enum
import functools
import math
import numbers
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Union

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np

from tff_medical import categories
from tff_medical.errors import parse_enum
from tff_medical.errors import PolicyError
from tff_medical.privacy.policy import PrivacyPolicy
from tff_medical.privacy.sampling import SamplingMethod
from tff_medical.privacy.sampling import SamplingSpec

# TFF keeps noise multipliers and clip norms in float32, so the multiplier it reports back can be
# a few float32 ulps (~1e-7 relative) below the planned one. Calibrated multipliers are raised by
# this much so that the planned number of rounds still fits the budget exactly.
CALIBRATION_MARGIN = 1e-5

# TFF's default clipped-count noise, as a fraction of the expected clients per round
# (DifferentiallyPrivateFactory.gaussian_adaptive; Andrew et al. recommend m / 20).
TFF_DEFAULT_COUNT_NOISE_FRACTION = 0.05


class Relation(enum.Enum):
  """The neighbouring relations each category's budget holds under (module docstring)."""

  REMOVE_CATEGORY_EXAMPLES = 'remove_category_examples'
  REMOVE_WHOLE_CLIENT = 'remove_whole_client'


RELATION_STATEMENTS = {
    Relation.REMOVE_CATEGORY_EXAMPLES:
        'adding or removing all of one client\'s category-c examples while the client stays',
    Relation.REMOVE_WHOLE_CLIENT:
        'adding or removing one whole client whose only examples are category c',
}


class Accountant(enum.Enum):
  RDP = 'rdp'
  PLD = 'pld'


EventsArg = Union[dp_accounting.DpEvent,
                  Iterable[Union[dp_accounting.DpEvent, tuple[dp_accounting.DpEvent, int]]]]


def as_accountant(value: Union[Accountant, str]) -> Accountant:
  return parse_enum(Accountant, value, 'accountant', PolicyError)


def neighboring_relation(method: SamplingMethod) -> dp_accounting.NeighboringRelation:
  """The neighbouring relation under which a sampling method can be accounted."""
  if method is SamplingMethod.FIXED_SIZE:
    return dp_accounting.NeighboringRelation.REPLACE_ONE
  return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _check_supported(accountant: Accountant, method: SamplingMethod) -> None:
  if accountant is Accountant.PLD and method is SamplingMethod.FIXED_SIZE:
    raise PolicyError(
        'accountant must be rdp for fixed_size sampling: dp_accounting 0.4.3 has no PLD for '
        'sampling without replacement. Found pld. Use Poisson sampling or the RDP accountant.')


def make_accountant(accountant: Union[Accountant, str],
                    method: SamplingMethod) -> dp_accounting.PrivacyAccountant:
  """A fresh dp_accounting accountant with the relation that `method` is accounted under."""
  accountant = as_accountant(accountant)
  _check_supported(accountant, method)
  relation = neighboring_relation(method)
  if accountant is Accountant.RDP:
    return rdp.RdpAccountant(neighboring_relation=relation)
  return pld.PLDAccountant(neighboring_relation=relation)


def check_sampling_accountant(sampling: SamplingSpec,
                              accountant: Union[Accountant, str]) -> Accountant:
  """Validates the pair; returns the accountant as an enum."""
  if not isinstance(sampling, SamplingSpec):
    raise PolicyError(f'sampling must be a SamplingSpec. Found {sampling!r}.')
  accountant = as_accountant(accountant)
  _check_supported(accountant, sampling.method)
  return accountant


def positive(field: str, value: Any) -> float:
  """`value` as a float; PolicyError in the one message format unless finite and positive."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or
      not math.isfinite(value) or value <= 0):
    raise PolicyError(f'{field} must be positive. Found {value!r}.')
  return float(value)


def _probability(field: str, value: Any) -> float:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or
      not 0 < value < 1):
    raise PolicyError(f'{field} must be in (0, 1). Found {value!r}.')
  return float(value)


def positive_int(field: str, value: Any) -> int:
  """`value` as an int; PolicyError in the one message format unless an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise PolicyError(f'{field} must be a positive integer. Found {value!r}.')
  return int(value)


def effective_noise_multiplier(event: dp_accounting.DpEvent) -> Optional[float]:
  """The one Gaussian multiplier equivalent to a per-round mechanism event.

  Args:
    event: An unsampled event of one round: a GaussianDpEvent, or Composed/SelfComposed events
      bottoming out in Gaussians (what TFF's DP aggregators report), NoOps allowed.

  Returns:
    z with 1 / z**2 the sum of 1 / z_i**2 over the Gaussians, or None if the event released
    nothing (only NoOps).

  Raises:
    PolicyError: for an event that is not a Gaussian composition (Laplace, non-private, a zero
      multiplier, or an already sampled event: the sampling is added by `round_event`).
  """
  inverse_square = _inverse_square_sum(event)
  if inverse_square is None or inverse_square == 0:
    return None
  return inverse_square**-0.5


def _inverse_square_sum(event: Any) -> Optional[float]:
  if isinstance(event, dp_accounting.NoOpDpEvent):
    return None
  if isinstance(event, dp_accounting.GaussianDpEvent):
    raw = event.noise_multiplier
    try:
      # TFF hands back numpy float32 scalars; TF Privacy run eagerly, 0-d tensors.
      z = float(raw) if not isinstance(raw, (bool, str, bytes)) else math.nan
    except (TypeError, ValueError):
      z = math.nan
    if not z > 0:
      raise PolicyError(f'GaussianDpEvent.noise_multiplier must be positive (zero noise is not '
                        f'private). Found {raw!r}.')
    return z**-2
  if isinstance(event, dp_accounting.ComposedDpEvent):
    parts = [_inverse_square_sum(e) for e in event.events]
    parts = [p for p in parts if p is not None]
    return sum(parts) if parts else None
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    inner = _inverse_square_sum(event.event)
    if inner is None or int(event.count) == 0:
      return None
    return int(event.count) * inner
  raise PolicyError('a round\'s mechanism event must be a GaussianDpEvent or a composition of '
                    f'them (unsampled; the round adds the sampling). Found {event!r}.')


def round_event(mechanism_event: Union[dp_accounting.DpEvent, float],
                sampling: SamplingSpec,
                accountant: Optional[Union[Accountant, str]] = None) -> dp_accounting.DpEvent:
  """The DpEvent of one round: the mechanism applied to the round's client sample.

  Args:
    mechanism_event: The unsampled mechanism of the round (see `effective_noise_multiplier`), or
      its effective noise multiplier (noise stddev / clip norm).
    sampling: How the round's clients were drawn.
    accountant: If given, refuses a combination that accountant cannot compose.

  Returns:
    PoissonSampledDpEvent(q, Gaussian(z)) for Poisson sampling, or
    SampledWithoutReplacementDpEvent(N, m, Gaussian(z / 2)) for a fixed-size sample (replace-one
    sensitivity is 2C, see the module docstring); NoOpDpEvent if nothing was released.
  """
  if not isinstance(sampling, SamplingSpec):
    raise PolicyError(f'sampling must be a SamplingSpec. Found {sampling!r}.')
  if accountant is not None:
    _check_supported(as_accountant(accountant), sampling.method)
  if isinstance(mechanism_event, dp_accounting.DpEvent):
    z = effective_noise_multiplier(mechanism_event)
  else:
    z = positive('noise_multiplier', mechanism_event)
  if z is None:
    return dp_accounting.NoOpDpEvent()
  if sampling.method is SamplingMethod.FIXED_SIZE:
    return dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=sampling.total_clients,
        sample_size=sampling.expected_clients_per_round,
        event=dp_accounting.GaussianDpEvent(z / 2))
  return dp_accounting.PoissonSampledDpEvent(
      sampling_probability=sampling.rate, event=dp_accounting.GaussianDpEvent(z))


def _contains(event: dp_accounting.DpEvent, kind: type) -> bool:
  if isinstance(event, kind):
    return True
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return any(_contains(e, kind) for e in event.events)
  inner = getattr(event, 'event', None)
  return isinstance(inner, dp_accounting.DpEvent) and _contains(inner, kind)


def _as_composed(events: EventsArg) -> dp_accounting.DpEvent:
  if isinstance(events, dp_accounting.DpEvent):
    return events
  if isinstance(events, tuple) and len(events) == 2 and isinstance(
      events[0], dp_accounting.DpEvent) and isinstance(events[1], numbers.Integral):
    events = [events]
  parts = []
  for item in events:
    if isinstance(item, dp_accounting.DpEvent):
      parts.append(item)
      continue
    if not (isinstance(item, tuple) and len(item) == 2 and
            isinstance(item[0], dp_accounting.DpEvent)):
      raise PolicyError(f'events must be DpEvents or (DpEvent, count) pairs. Found {item!r}.')
    event, count = item
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
      raise PolicyError(f'count must be a non-negative integer. Found {count!r}.')
    if count:
      # One self-composition per group: RDP scales by count, PLD self-composes by FFT, so the
      # cost does not grow with the number of rounds.
      parts.append(dp_accounting.SelfComposedDpEvent(event, int(count)))
  return dp_accounting.ComposedDpEvent(parts)


def epsilon(events: EventsArg,
            delta: float,
            accountant: Union[Accountant, str] = Accountant.RDP) -> float:
  """Epsilon at `delta` of the composition of `events`, by a fresh dp_accounting accountant.

  Args:
    events: A DpEvent, a (DpEvent, count) pair, or a sequence of DpEvents and (DpEvent, count)
      pairs. Sampled events built by `round_event`; the neighbouring relation follows from them
      (replace-one if they sample without replacement, else add-or-remove-one).
    delta: Target delta, in (0, 1).
    accountant: RDP or PLD.

  Returns:
    Epsilon (0.0 for an empty composition; inf for a non-private one).
  """
  accountant = as_accountant(accountant)
  delta = _probability('delta', delta)
  event = _as_composed(events)
  without_replacement = _contains(event, dp_accounting.SampledWithoutReplacementDpEvent)
  if without_replacement and _contains(event, dp_accounting.PoissonSampledDpEvent):
    raise PolicyError('events must all use one sampling method. Found both Poisson and '
                      'without-replacement sampling.')
  method = SamplingMethod.FIXED_SIZE if without_replacement else SamplingMethod.POISSON
  acc = make_accountant(accountant, method)
  try:
    acc.compose(event)
  except dp_accounting.UnsupportedEventError as e:
    raise PolicyError(f'events must be supported by the {accountant.value} accountant. '
                      f'Found: {e}') from None
  return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _round_rdp(z: float, sampling: SamplingSpec) -> tuple[np.ndarray, np.ndarray]:
  """(orders, RDP curve) of one round at multiplier z, from dp_accounting's RDP accountant."""
  acc = make_accountant(Accountant.RDP, sampling.method)
  acc.compose(round_event(z, sampling))
  orders, curve = np.array(acc.orders), np.array(acc.rdp)
  orders.setflags(write=False)
  curve.setflags(write=False)
  return orders, curve


def rounds_epsilon(groups: Iterable[tuple],
                   sampling: SamplingSpec,
                   delta: float,
                   accountant: Union[Accountant, str] = Accountant.RDP) -> float:
  """Epsilon of rounds given as (effective multiplier, count[, sampling]) groups.

  The same figure as `epsilon([(round_event(z, sampling), count), ...], delta, accountant)`;
  a group's own SamplingSpec (an earlier run on the same data) replaces `sampling`.
  For RDP, each distinct multiplier's RDP curve is computed once by dp_accounting and cached
  (a curve costs ~0.1-0.3 s; a ledger asks for a few epsilons every round, over a handful of
  distinct multipliers); composing is then count * curve summed, which is what
  RdpAccountant.compose does, and dp_accounting's compute_epsilon converts it. PLD has no such
  shortcut: each call composes the groups afresh (seconds per group).
  """
  accountant = check_sampling_accountant(sampling, accountant)
  delta = _probability('delta', delta)
  groups = [(positive('noise_multiplier', g[0]), positive_int('count', g[1]),
             g[2] if len(g) > 2 else sampling) for g in groups]
  if not groups:
    return 0.0
  methods = {spec.method for _, _, spec in groups}
  if len(methods) > 1:
    raise PolicyError('rounds must all use one sampling method to compose under one relation. '
                      'Found both Poisson and fixed-size sampling.')
  if accountant is Accountant.PLD:
    return epsilon([(round_event(z, spec), n) for z, n, spec in groups], delta, accountant)
  orders, total = None, 0.0
  for z, n, spec in groups:
    orders, curve = _round_rdp(z, spec)
    total = total + n * curve
  return float(rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])


def calibrate_noise_multiplier(target_epsilon: float,
                               delta: float,
                               rounds: int,
                               sampling: SamplingSpec,
                               accountant: Union[Accountant, str] = Accountant.RDP,
                               earlier: EventsArg = ()) -> float:
  """Smallest z (within 1e-6, plus CALIBRATION_MARGIN) meeting (target_epsilon, delta).

  Calibrates `rounds` rounds of `round_event(z, sampling)`, after the `earlier` events (what
  earlier runs released from the same data), with dp_accounting.calibrate_dp_mechanism. The
  result is the effective multiplier the accountant is fed; with adaptive clipping it is split
  by `category_splits`.
  """
  target_epsilon = positive('target_epsilon', target_epsilon)
  delta = _probability('delta', delta)
  rounds = positive_int('rounds', rounds)
  accountant = check_sampling_accountant(sampling, accountant)
  earlier = list(earlier)

  def make_event(z):
    new_rounds = dp_accounting.SelfComposedDpEvent(round_event(z, sampling), rounds)
    return dp_accounting.ComposedDpEvent([_as_composed(earlier), new_rounds]) if earlier \
        else new_rounds

  if earlier:
    already = epsilon(earlier, delta, accountant)
    if already >= target_epsilon:
      raise PolicyError(f'target_epsilon must exceed what earlier runs on the same data spent. '
                        f'Found {target_epsilon:g}, already spent {already:.4g}.')

  def calibrate(kind, bracket):
    try:
      return float(
          dp_accounting.calibrate_dp_mechanism(lambda: make_accountant(kind, sampling.method),
                                               make_event, target_epsilon, delta, bracket))
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
      return epsilon((make_event(z), 1), delta, Accountant.PLD) - target_epsilon

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

  Relation (a): the clipped count has sensitivity 1 (module docstring), so its multiplier is s,
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


def category_event(tff_event: dp_accounting.DpEvent) -> dp_accounting.GaussianDpEvent:
  """The per-category mechanism of one round, from the event TFF's gaussian_adaptive records.

  TFF records ComposedDpEvent([Gaussian(z_v), Gaussian(2 s)]): the value sum, then the clipped
  count at sensitivity 0.5. Under the per-category relation the count's sensitivity is 1
  (module docstring), i.e. multiplier s, so the round is one Gaussian of multiplier
  (z_v**-2 + (2 s / 2)**-2)**-0.5. Feed the ledger this, never TFF's event: composing TFF's
  event as is would understate the spend.

  Raises:
    PolicyError: for any other event shape (the value/count order cannot be told otherwise).
  """
  events = getattr(tff_event, 'events', None)
  if not (isinstance(tff_event, dp_accounting.ComposedDpEvent) and len(events) == 2 and
          all(isinstance(e, dp_accounting.GaussianDpEvent) for e in events)):
    raise PolicyError('a category\'s DP event must be what TFF\'s gaussian_adaptive records: '
                      'ComposedDpEvent([GaussianDpEvent(value), GaussianDpEvent(count)]). '
                      f'Found {tff_event!r}.')
  value_inverse_square, count_inverse_square = (_inverse_square_sum(e) for e in events)
  # TFF's count multiplier is 2 s: at sensitivity 1 it is half that.
  return dp_accounting.GaussianDpEvent(
      (value_inverse_square + 4 * count_inverse_square)**-0.5)


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


class CategoryRoundEvents(NamedTuple):
  """One category's round under each relation: what the ledger records."""

  remove_category_examples: dp_accounting.GaussianDpEvent
  remove_whole_client: dp_accounting.GaussianDpEvent


def whole_client_events(tff_events: Mapping[str, Optional[dp_accounting.DpEvent]]
                       ) -> dict[str, Optional[dp_accounting.GaussianDpEvent]]:
  """Each released category's round under relation (b), from TFF's recorded events.

  tff_events: category -> what gaussian_adaptive records, ComposedDpEvent([Gaussian(z_v),
  Gaussian(2 s)]) (count at sensitivity 0.5, right for a whole client), or None if not
  released. Category c's round is its value and count Gaussians composed with the count
  Gaussians of every other released category: one Gaussian, 1/z**2 = sum of 1/z_i**2.
  """
  parts = {}
  for c, event in tff_events.items():
    if event is None:
      continue
    category_event(event)  # Refuses any other shape.
    parts[c] = event.events
  return {
      c: (dp_accounting.GaussianDpEvent(effective_noise_multiplier(dp_accounting.ComposedDpEvent(
          list(parts[c]) + [parts[d][1] for d in parts if d != c])))
          if c in parts else None)
      for c in tff_events
  }
