"""Privacy accounting through dp_accounting: which accountant, our rounds as DpEvents, epsilon.

Epsilon always comes from dp_accounting's accountants; the mapping from our mechanism to DpEvents
is derived in docs/PRIVACY.md. Calibration and the adaptive-clip split are in calibration.py.
"""
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

from tff_medical.errors import parse_enum
from tff_medical.errors import PolicyError
from tff_medical.privacy.sampling import SamplingMethod
from tff_medical.privacy.sampling import SamplingSpec


class Relation(enum.Enum):
  """The neighbouring relations each category's budget holds under (docs/PRIVACY.md)."""

  REMOVE_CATEGORY_EXAMPLES = 'remove_category_examples'
  REMOVE_WHOLE_CLIENT = 'remove_whole_client'


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


# The one rule tying the accountant to the sampling method (config, ledgers and accounting ask it).
FIXED_SIZE_NEEDS_RDP = 'dp_accounting 0.4.3 has no PLD for sampling without replacement'


def sampling_accountant_problem(method: Union[SamplingMethod, str],
                                accountant: Union[Accountant, str]) -> Optional[str]:
  """Why `accountant` cannot account `method` sampling (fixed-size needs RDP); None if it can."""
  if (as_accountant(accountant) is Accountant.PLD and
      SamplingMethod(method) is SamplingMethod.FIXED_SIZE):
    return (f'accountant must be rdp for fixed_size sampling: {FIXED_SIZE_NEEDS_RDP}. Found pld. '
            'Use Poisson sampling or the RDP accountant.')
  return None


def _check_supported(accountant: Accountant, method: SamplingMethod) -> None:
  problem = sampling_accountant_problem(method, accountant)
  if problem:
    raise PolicyError(problem)


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


def probability(field: str, value: Any) -> float:
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
    sensitivity is 2C, see docs/PRIVACY.md); NoOpDpEvent if nothing was released.
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


def as_composed(events: EventsArg) -> dp_accounting.DpEvent:
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
  delta = probability('delta', delta)
  event = as_composed(events)
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
  delta = probability('delta', delta)
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


def category_event(tff_event: dp_accounting.DpEvent) -> dp_accounting.GaussianDpEvent:
  """The per-category mechanism of one round, from the event TFF's gaussian_adaptive records.

  TFF records ComposedDpEvent([Gaussian(z_v), Gaussian(2 s)]): the value sum, then the clipped
  count at sensitivity 0.5. Under the per-category relation the count's sensitivity is 1
  (docs/PRIVACY.md), i.e. multiplier s, so the round is one Gaussian of multiplier
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
