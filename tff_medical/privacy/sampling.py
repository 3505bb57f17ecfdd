"""Client sampling for each round, matched to how the round is accounted (docs/PRIVACY.md)."""

import dataclasses
import enum
import numbers
import secrets
from typing import Any, Mapping, Union

import numpy as np

from tff_medical.errors import parse_enum
from tff_medical.errors import PolicyError


# 256 bits: the sample must not be guessable by anyone who sees the published outputs.
_SECRET_BITS = 256


def new_secret() -> int:
  """A sampler seed from OS entropy, for a run whose samples must stay secret."""
  return secrets.randbits(_SECRET_BITS)


class SamplingMethod(enum.Enum):
  POISSON = 'poisson'
  FIXED_SIZE = 'fixed_size'


def _positive_int(field: str, value: Any) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
    raise PolicyError(f'{field} must be a positive integer. Found {value!r}.')
  return int(value)


def _non_negative_int(field: str, value: Any) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
    raise PolicyError(f'{field} must be a non-negative integer. Found {value!r}.')
  return int(value)


def _sampling_method(value: Any) -> SamplingMethod:
  return parse_enum(SamplingMethod, value, 'sampling method', PolicyError)


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """How clients are sampled each round: what the accountant must be told.

  Attributes:
    method: Poisson (each client with probability `rate`) or a fixed-size sample.
    total_clients: N, the size of the client population.
    expected_clients_per_round: m; exact for a fixed-size sample, the mean for Poisson.
  """

  method: SamplingMethod
  total_clients: int
  expected_clients_per_round: int

  def __post_init__(self):
    object.__setattr__(self, 'method', _sampling_method(self.method))
    total = _positive_int('total_clients', self.total_clients)
    expected = _positive_int('expected_clients_per_round', self.expected_clients_per_round)
    if expected > total:
      raise PolicyError(f'expected_clients_per_round must be at most total_clients ({total}). '
                        f'Found {expected}.')
    object.__setattr__(self, 'total_clients', total)
    object.__setattr__(self, 'expected_clients_per_round', expected)

  @property
  def rate(self) -> float:
    """q = m / N: each client's probability of being in a round's sample."""
    return self.expected_clients_per_round / self.total_clients

  def to_json_dict(self) -> dict[str, Any]:
    return {
        'method': self.method.value,
        'total_clients': self.total_clients,
        'expected_clients_per_round': self.expected_clients_per_round,
    }

  @classmethod
  def from_json_dict(cls, raw: Mapping[str, Any]) -> 'SamplingSpec':
    if not isinstance(raw, Mapping):
      raise PolicyError(f'sampling must be a JSON object. Found {raw!r}.')
    return cls(
        method=raw.get('method'),
        total_clients=raw.get('total_clients'),
        expected_clients_per_round=raw.get('expected_clients_per_round'))

  def differences(self, other: 'SamplingSpec') -> list[str]:
    """Human-readable 'field: mine vs other' for each field that differs."""
    mine, theirs = self.to_json_dict(), other.to_json_dict()
    return [f'{key}: {mine[key]!r} vs {theirs[key]!r}' for key in mine if mine[key] != theirs[key]]


class _Sampler:
  """Shared parts: validation, spec, stateless per-round generator, state round trip."""

  METHOD: SamplingMethod

  def __init__(self, total_clients: int, expected_clients_per_round: int, seed: int):
    self._spec = SamplingSpec(self.METHOD, total_clients, expected_clients_per_round)
    self._seed = _non_negative_int('seed', seed)

  @property
  def spec(self) -> SamplingSpec:
    return self._spec

  @property
  def rate(self) -> float:
    return self._spec.rate

  @property
  def total_clients(self) -> int:
    return self._spec.total_clients

  @property
  def expected_clients_per_round(self) -> int:
    return self._spec.expected_clients_per_round

  @property
  def seed(self) -> int:
    return self._seed

  def _rng(self, round_num: int) -> np.random.Generator:
    round_num = _non_negative_int('round_num', round_num)
    # Seeding with the pair gives independent streams per round without any carried state.
    return np.random.default_rng([self._seed, round_num])

  def sample(self, round_num: int) -> np.ndarray:
    raise NotImplementedError

  def state(self) -> dict[str, Any]:
    """Everything needed to resume: the samples are a function of (seed, round_num)."""
    return dict(self._spec.to_json_dict(), seed=self._seed)

  @classmethod
  def from_state(cls,
                 state: Mapping[str, Any],
                 spec: Union[SamplingSpec, None] = None) -> '_Sampler':
    """Rebuilds a sampler; refuses a state of another method, or one that differs from `spec`.

    Args:
      state: The output of `state()`.
      spec: The sampling the resumed run is configured with, if it should be checked.

    Returns:
      The sampler that draws the same sample as the saved one for every round.
    """
    if not isinstance(state, Mapping):
      raise PolicyError(f'sampler state must be a mapping. Found {state!r}.')
    saved = SamplingSpec.from_json_dict(state)
    if saved.method is not cls.METHOD:
      raise PolicyError(f'sampler state method must be {cls.METHOD.value!r} for '
                        f'{cls.__name__}. Found {saved.method.value!r}.')
    if spec is not None and saved != spec:
      raise PolicyError('sampler state must match the configured sampling. Found differences '
                        f'(saved vs configured): {"; ".join(saved.differences(spec))}.')
    return cls(saved.total_clients, saved.expected_clients_per_round, state.get('seed'))

  def __repr__(self):
    # Never the seed: a repr can reach a log, and the seed reveals every round's sample.
    return (f'{type(self).__name__}(total_clients={self.total_clients}, '
            f'expected_clients_per_round={self.expected_clients_per_round})')


class PoissonSampler(_Sampler):
  """Each client is in a round independently with probability q = m / N.

  The sample size varies (Binomial(N, q)) and may be zero; the DP mechanism still runs on an
  empty round, which is what the Poisson accounting assumes.
  """

  METHOD = SamplingMethod.POISSON

  def sample(self, round_num: int) -> np.ndarray:
    """Sorted indices (int64) of the clients in round `round_num`."""
    rng = self._rng(round_num)
    return np.flatnonzero(rng.random(self.total_clients) < self.rate).astype(np.int64)


class FixedSizeSampler(_Sampler):
  """Exactly m distinct clients a round, uniformly without replacement."""

  METHOD = SamplingMethod.FIXED_SIZE

  def sample(self, round_num: int) -> np.ndarray:
    """Sorted indices (int64) of the m clients in round `round_num`."""
    rng = self._rng(round_num)
    chosen = rng.choice(self.total_clients, size=self.expected_clients_per_round, replace=False)
    return np.sort(chosen).astype(np.int64)


Sampler = Union[PoissonSampler, FixedSizeSampler]
_SAMPLERS = {SamplingMethod.POISSON: PoissonSampler, SamplingMethod.FIXED_SIZE: FixedSizeSampler}


def make_sampler(spec: SamplingSpec, seed: int) -> Sampler:
  """The sampler that draws what `spec` describes."""
  if not isinstance(spec, SamplingSpec):
    raise PolicyError(f'spec must be a SamplingSpec. Found {spec!r}.')
  return _SAMPLERS[spec.method](spec.total_clients, spec.expected_clients_per_round, seed)


def sampler_from_state(state: Mapping[str, Any],
                       spec: Union[SamplingSpec, None] = None) -> Sampler:
  """Rebuilds whichever sampler `state` describes (see `_Sampler.from_state`)."""
  if not isinstance(state, Mapping):
    raise PolicyError(f'sampler state must be a mapping. Found {state!r}.')
  return _SAMPLERS[_sampling_method(state.get('method'))].from_state(state, spec)

