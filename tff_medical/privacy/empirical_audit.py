"""Empirical epsilon from canary statistics, per category (Andrew et al., ICLR 2024, one-shot).

Method, choices and measured noise floor: docs/PRIVACY_AUDIT.md. `epsilon_two_gaussians` is ported
from google-research/federated one_shot_epe/empirical_privacy_estimation_lib.py (Apache-2.0).
"""

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
from dp_accounting.pld import privacy_loss_mechanism

from tff_medical.errors import PolicyError

_norm_logcdf = scipy.stats.norm.logcdf
# Fewer resamples than this make the interval's ends themselves noisy.
MIN_BOOTSTRAP = 50
MIN_CANARIES = 10


@functools.lru_cache(maxsize=4096)
def _log_delta_two_gaussians(mu1: float, std1: float, mu2: float, std2: float,
                             eps: float) -> float:
  """log delta(eps) of P = N(mu1, std1^2) against Q = N(mu2, std2^2) (one direction)."""
  a = 0.5 * (std2**-2 - std1**-2)
  b = mu1 / std1**2 - mu2 / std2**2
  c = 0.5 * ((mu2 / std2)**2 - (mu1 / std1)**2) + math.log(std2) - math.log(std1)
  if std1 == std2:
    if b == 0:
      return -math.inf  # Identical distributions.
    pr_z1 = _norm_logcdf(mu1, (eps - c) / b, std1) if b > 0 else _norm_logcdf((eps - c) / b, mu1,
                                                                              std1)
    pr_z2 = _norm_logcdf(mu2, (eps - c) / b, std2) if b > 0 else _norm_logcdf((eps - c) / b, mu2,
                                                                              std2)
  else:
    determinant = b**2 - 4 * a * (c - eps)
    if determinant <= 0:
      return -math.inf
    i_1 = (-b - math.sqrt(determinant)) / (2 * a)
    i_2 = (-b + math.sqrt(determinant)) / (2 * a)
    i_left, i_right = min(i_1, i_2), max(i_1, i_2)
    if a >= 0:
      pr_z1 = np.logaddexp(_norm_logcdf(i_left, mu1, std1), _norm_logcdf(mu1, i_right, std1))
      pr_z2 = np.logaddexp(_norm_logcdf(i_left, mu2, std2), _norm_logcdf(mu2, i_right, std2))
    else:
      pr_z1 = scipy.special.logsumexp(
          [_norm_logcdf(i_right, mu1, std1), _norm_logcdf(i_left, mu1, std1)], b=[1, -1])
      pr_z2 = scipy.special.logsumexp(
          [_norm_logcdf(i_right, mu2, std2), _norm_logcdf(i_left, mu2, std2)], b=[1, -1])
  if pr_z1 == -math.inf:
    return -math.inf  # The event has no mass under P: no delta.
  factor = eps + pr_z2 - pr_z1
  if factor >= 0:
    return -math.inf
  return float(pr_z1 + np.log1p(-np.exp(factor)))


def epsilon_two_gaussians(mu1: float, std1: float, mu2: float, std2: float,
                          delta: float) -> float:
  """The smallest epsilon with N(mu1, std1^2) and N(mu2, std2^2) (epsilon, delta)-close."""
  for name, value in (('std1', std1), ('std2', std2)):
    if not (math.isfinite(value) and value > 0):
      raise PolicyError(f'{name} must be positive. Found {value!r}.')
  if not 0 < delta < 1:
    raise PolicyError(f'delta must be in (0, 1). Found {delta!r}.')
  mu1, std1, mu2, std2 = float(mu1), float(std1), float(mu2), float(std2)

  def max_log_delta(eps):
    return max(_log_delta_two_gaussians(mu1, std1, mu2, std2, eps),
               _log_delta_two_gaussians(mu2, std2, mu1, std1, eps))

  log_delta = math.log(delta)
  if max_log_delta(0.0) <= log_delta:
    return 0.0
  low, high = 0.0, 1.0
  while max_log_delta(high) > log_delta:
    low, high = high, high * 10
    if high > 1e6:
      return math.inf
  return float(scipy.optimize.brentq(lambda e: max_log_delta(e) - log_delta, low, high))


@dataclasses.dataclass(frozen=True)
class GaussianFit:
  mean: float
  std: float
  count: int

  @classmethod
  def of(cls, values: np.ndarray) -> 'GaussianFit':
    return cls(float(np.mean(values)), float(np.std(values, ddof=1)), int(len(values)))


def _checked(name: str, values, minimum: int = MIN_CANARIES) -> np.ndarray:
  array = np.asarray(values, np.float64).ravel()
  if array.size < minimum or not np.all(np.isfinite(array)):
    raise PolicyError(f'{name} must hold at least {minimum} finite canary statistics. '
                      f'Found {array.size} ({int(np.sum(~np.isfinite(array)))} not finite).')
  return array


def gaussian_mechanism_epsilon(shift: float, delta: float) -> float:
  """Epsilon at `delta` of N(0, 1) against N(shift, 1): dp_accounting's Gaussian mechanism."""
  shift = abs(float(shift))
  if shift == 0:
    return 0.0
  if not math.isfinite(shift):
    return math.inf
  loss = privacy_loss_mechanism.GaussianPrivacyLoss(standard_deviation=1.0, sensitivity=shift)
  if loss.get_delta_for_epsilon(0.0) <= delta:
    return 0.0
  high = 1.0
  while loss.get_delta_for_epsilon(high) > delta:
    high *= 2
  return float(scipy.optimize.brentq(lambda e: loss.get_delta_for_epsilon(e) - delta, 0.0, high,
                                     xtol=1e-6))


@dataclasses.dataclass(frozen=True)
class Estimate:
  """One empirical epsilon with its bootstrap interval and the fits it came from."""

  epsilon: float
  interval: tuple[float, float]
  confidence: float
  shift: float  # Mean of the inserted canaries' statistic minus the null's, in null stddevs.
  seen: GaussianFit
  null: GaussianFit
  null_source: str  # 'closed_form' (N(0, 1/d)) or 'unseen_canaries'.
  epsilon_unequal_variances: float  # The paper's two separately fitted Gaussians (see below).

  def to_json_dict(self) -> dict[str, Any]:
    return {'epsilon': _finite_or_none(self.epsilon),
            'interval': [_finite_or_none(v) for v in self.interval],
            'confidence': self.confidence, 'shift': self.shift,
            'epsilon_unequal_variances': _finite_or_none(self.epsilon_unequal_variances),
            'seen_fit': dataclasses.asdict(self.seen), 'null_fit': dataclasses.asdict(self.null),
            'null_source': self.null_source}


def _finite_or_none(value: float) -> Optional[float]:
  # JSON has no infinity; None reads as "unbounded" in the report.
  return float(value) if math.isfinite(value) else None


def _shift(seen: np.ndarray, unseen: Optional[np.ndarray], dim: Optional[int]) -> float:
  """The mean shift in units of the (pooled) stddev: the canary as a Gaussian mechanism."""
  if unseen is None:
    return float(np.mean(seen) * math.sqrt(dim))  # Null N(0, 1/d) exactly.
  pooled = math.sqrt(((seen.size - 1) * np.var(seen, ddof=1) +
                      (unseen.size - 1) * np.var(unseen, ddof=1)) / (seen.size + unseen.size - 2))
  difference = float(np.mean(seen) - np.mean(unseen))
  if pooled == 0:
    return 0.0 if difference == 0 else math.inf
  return difference / pooled


def estimate(seen: Sequence[float], delta: float, *, unseen: Optional[Sequence[float]] = None,
             dim: Optional[int] = None, confidence: float = 0.95, bootstrap: int = 200,
             seed: int = 0) -> Estimate:
  """The empirical epsilon of inserted canaries' statistics `seen` against their null.

  A canary adds a fixed vector to what a Gaussian mechanism releases: its statistic moves in
  mean, not in spread. So the two Gaussians share one (pooled) stddev, and the epsilon is that
  of the Gaussian mechanism whose sensitivity is the shift (dp_accounting). The paper's fit of
  two separate stddevs is reported too (`epsilon_unequal_variances`, point only): at delta
  1e-5 its value is dominated by the sampling error of the two fitted stddevs (with 1,000
  canaries and no signal at all, its bootstrap upper end is near 2; docs/PRIVACY_AUDIT.md).

  Args:
    seen: One statistic per inserted canary.
    delta: The run's delta.
    unseen: One statistic per never-inserted canary: the null is fitted to them.
    dim: Without `unseen`: the dimension d, the null being the cosine's closed form N(0, 1/d).
    confidence: Of the bootstrap percentile interval (canaries resampled with replacement).
    bootstrap: Number of resamples.
    seed: Of the resampling only.
  """
  seen = _checked('seen', seen)
  if (unseen is None) == (dim is None):
    raise PolicyError('estimate needs exactly one null: unseen canary statistics or the '
                      f'dimension. Found unseen={unseen is not None}, dim={dim!r}.')
  if not 0 < confidence < 1:
    raise PolicyError(f'confidence must be in (0, 1). Found {confidence!r}.')
  if not 0 < delta < 1:
    raise PolicyError(f'delta must be in (0, 1). Found {delta!r}.')
  if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < MIN_BOOTSTRAP:
    raise PolicyError(f'bootstrap must be an integer of at least {MIN_BOOTSTRAP}. '
                      f'Found {bootstrap!r}.')
  if unseen is not None:
    unseen = _checked('unseen', unseen)
    null_fit = GaussianFit.of(unseen)
    source = 'unseen_canaries'
  else:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
      raise PolicyError(f'dim must be an integer of at least 2. Found {dim!r}.')
    null_fit = GaussianFit(0.0, dim**-0.5, 0)
    source = 'closed_form'
  seen_fit = GaussianFit.of(seen)
  shift = _shift(seen, unseen, dim)
  rng = np.random.default_rng(seed)
  shifts = np.array([
      abs(_shift(rng.choice(seen, seen.size),
                 None if unseen is None else rng.choice(unseen, unseen.size), dim))
      for _ in range(bootstrap)])
  # Epsilon grows with |shift|: the percentiles of |shift| map to those of epsilon.
  tail = (1 - confidence) / 2 * 100
  low, high = np.percentile(shifts, [tail, 100 - tail])
  unequal = (epsilon_two_gaussians(null_fit.mean, null_fit.std, seen_fit.mean, seen_fit.std, delta)
             if seen_fit.std > 0 and null_fit.std > 0 else math.inf)
  return Estimate(gaussian_mechanism_epsilon(shift, delta),
                  (gaussian_mechanism_epsilon(low, delta), gaussian_mechanism_epsilon(high, delta)),
                  confidence, shift, seen_fit, null_fit, source, unequal)


@dataclasses.dataclass(frozen=True)
class CategoryStatistics:
  """What an audit run measured for one category's canaries (see training/canaries.py)."""

  final_seen: np.ndarray  # Cosine of each inserted canary with the total delta.
  max_seen: np.ndarray  # Max over released rounds of the cosine with the round's delta.
  max_unseen: np.ndarray  # The same for never-inserted canaries.
  dim: int
  rounds: int
  insertions: int  # Canary insertions over the run (a canary may be sampled several times).


def category_report(stats: CategoryStatistics, claimed_epsilon: Optional[float], delta: float,
                    *, confidence: float = 0.95, bootstrap: int = 200,
                    seed: int = 0) -> dict[str, Any]:
  """One category's entry of empirical_audit.json: both estimates against the claim.

  `passed` compares the upper end of the all-iterates interval with the claim (the claim covers
  every released round): an empirical epsilon above it means the mechanism leaks more than the
  ledger says.
  """
  all_iterates = estimate(stats.max_seen, delta, unseen=stats.max_unseen,
                          confidence=confidence, bootstrap=bootstrap, seed=seed)
  final = estimate(stats.final_seen, delta, dim=stats.dim, confidence=confidence,
                   bootstrap=bootstrap, seed=seed + 1)
  upper = all_iterates.interval[1]
  report = {'all_iterates': all_iterates.to_json_dict(), 'final_model': final.to_json_dict(),
            'claimed_epsilon': claimed_epsilon, 'canaries_inserted': int(stats.max_seen.size),
            'canaries_never_inserted': int(stats.max_unseen.size),
            'insertions': stats.insertions, 'rounds': stats.rounds, 'dim': stats.dim}
  if claimed_epsilon is not None:
    report['gap'] = _finite_or_none(claimed_epsilon - upper)
    report['passed'] = bool(math.isfinite(upper) and upper <= claimed_epsilon)
  return report


def failing_categories(report: Mapping[str, Any]) -> list[str]:
  """The categories of an empirical_audit.json whose empirical epsilon exceeds the claim."""
  return [c for c, entry in report.get('categories', {}).items() if entry.get('passed') is False]


def _fmt(value: Optional[float], digits: int = 3) -> str:
  return '∞' if value is None else f'{value:.{digits}f}'


def markdown_table(report: Mapping[str, Any]) -> str:
  """empirical_audit.json as a Markdown table: claimed against empirical, per category."""
  confidence = report.get('confidence', 0.95)
  lines = [
      f'| Category | Claimed ε (ledger, this run) | Empirical ε, all iterates [{confidence:.0%} '
      'interval] | Gap (claimed − upper end) | Empirical ε, final sub-aggregate | Released model: '
      'all iterates / final | Canary insertions | Passed |',
      '|---|---:|---:|---:|---:|---:|---:|:---:|',
  ]
  for c, entry in report.get('categories', {}).items():
    mech, model = entry['mechanism'], entry['released_model']
    low, high = mech['all_iterates']['interval']
    lines.append(
        f'| {c} | {_fmt(entry.get("claimed_epsilon"))} | '
        f'{_fmt(mech["all_iterates"]["epsilon"])} [{_fmt(low)}, {_fmt(high)}] | '
        f'{_fmt(mech.get("gap"))} | {_fmt(mech["final_model"]["epsilon"])} | '
        f'{_fmt(model["all_iterates"]["epsilon"])} / {_fmt(model["final_model"]["epsilon"])} | '
        f'{entry["mechanism"]["insertions"]} | {"yes" if entry.get("passed") else "**no**"} |')
  return '\n'.join(lines)
