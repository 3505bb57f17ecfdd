"""Calibration of the shared-noise ("Scale") mechanism: one noise draw, per-category clips.

The derivation and its client-level cost are in docs/PRIVACY.md.
"""

import dataclasses
import enum
import math
import numbers
from typing import Any, Mapping, Optional, Sequence, Union

from tff_medical import categories
from tff_medical.errors import parse_enum
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration


class NoiseMechanism(enum.Enum):
  """How the categories' sub-aggregates are noised (config.dp_mechanism)."""

  PER_CATEGORY_NOISE = 'per_category_noise'  # One Gaussian per category (class_aware.dp).
  SHARED_NOISE = 'shared_noise'  # One Gaussian for all, per-category clips (this module).


def as_noise_mechanism(value: Union[NoiseMechanism, str]) -> NoiseMechanism:
  return parse_enum(NoiseMechanism, value, 'noise_mechanism', PolicyError)


def client_noise_multiplier(noise_multipliers: Sequence[Optional[float]],
                            mechanism: Union[NoiseMechanism, str]) -> Optional[float]:
  """One round's client-level multiplier from its released categories' effective multipliers.

  Per-category noise: independent Gaussians on the same sample, 1/z**2 = sum 1/z_c**2.
  Shared noise: one Gaussian, a whole client moves it by sum_c w_c C_c, so 1/z = sum 1/z_c (an
  upper bound on the true client-level cost, see docs/PRIVACY.md). None: nothing released.
  """
  mechanism = as_noise_mechanism(mechanism)
  zs = [z for z in noise_multipliers if z is not None]
  if not zs:
    return None
  if mechanism is NoiseMechanism.SHARED_NOISE:
    return 1.0 / sum(1.0 / accounting.positive('noise_multiplier', z) for z in zs)
  # Same rule as accounting.effective_noise_multiplier, which also validates each z.
  import dp_accounting  # pylint: disable=g-import-not-at-top
  return accounting.effective_noise_multiplier(
      dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z) for z in zs]))


def shared_noise_splits(noise_multipliers: Mapping[str, float],
                        expected_clients_per_round: float,
                        **kwargs) -> dict[str, calibration.AdaptiveClipSplit]:
  """Each category's split of z_c at ONE clipped-count stddev (the shared count's).

  Args:
    noise_multipliers: {category: z_c}, all six (calibration.calibrate_category_noise).
    expected_clients_per_round: m.
    **kwargs: max_value_noise_inflation, max_count_noise_fraction, as for
      calibration.choose_clipped_count_stddev, applied to the largest z_c (the binding one).

  Returns:
    {category: AdaptiveClipSplit(z_c, m, s_n)} in CATEGORY_IDS order; same s_n for all.
  """
  zs = _all_categories('noise_multipliers', noise_multipliers)
  largest = calibration.choose_clipped_count_stddev(max(zs.values()), expected_clients_per_round,
                                                   **kwargs)
  return {
      c: calibration.adaptive_clip_split(zs[c], largest.expected_clients_per_round,
                                        largest.clipped_count_stddev)
      for c in categories.CATEGORY_IDS
  }


@dataclasses.dataclass(frozen=True)
class SharedNoiseCalibration:
  """The shared-noise mechanism's constants: sigma = noise_scale * C, C_c = clip_ratios[c] * C.

  Attributes:
    noise_multipliers: z_c, each category's effective multiplier (what its ledger is fed).
    value_noise_multipliers: z_v,c, the value share of z_c: sigma / (w_c C_c).
    combination_weights: w_c > 0, applied to each category's clipped sum before the noise.
    noise_scale: s, the IDP-SGD scale: sigma = s * C.
    clip_ratios: C_c / C = s / (w_c z_v,c).
    clipped_count_stddev: s_n, stddev of the noise on the one clipped count.
    expected_clients_per_round: m (the denominator and the count's expected records).
  """

  noise_multipliers: Mapping[str, float]
  value_noise_multipliers: Mapping[str, float]
  combination_weights: Mapping[str, float]
  noise_scale: float
  clip_ratios: Mapping[str, float]
  clipped_count_stddev: float
  expected_clients_per_round: float

  def value_noise_stddev(self, base_clip: float) -> float:
    """sigma at base clip C."""
    return self.noise_scale * accounting.positive('base_clip', base_clip)

  def clip_norms(self, base_clip: float) -> dict[str, float]:
    """C_c at base clip C."""
    base_clip = accounting.positive('base_clip', base_clip)
    return {c: self.clip_ratios[c] * base_clip for c in categories.CATEGORY_IDS}

  @property
  def client_noise_multiplier(self) -> float:
    """What the ledger accounts a round releasing every category at: 1 / sum_c (1 / z_c)."""
    return client_noise_multiplier(list(self.noise_multipliers.values()),
                                   NoiseMechanism.SHARED_NOISE)

  def per_category_noise_variance_ratio(self,
                                        per_category_value_multipliers: Mapping[str, float]
                                       ) -> float:
    """sum_c (w_c z'_c C_c)**2 / sigma**2: per-category noise (multipliers z'_c) vs Scale at the
    same clips C_c. Independent of C."""
    return sum((self.combination_weights[c] * per_category_value_multipliers[c] *
                self.clip_ratios[c] / self.noise_scale)**2 for c in categories.CATEGORY_IDS)


def _all_categories(field: str, value: Any) -> dict[str, float]:
  if not isinstance(value, Mapping) or set(value) != set(categories.CATEGORY_IDS):
    found = sorted(map(str, value)) if isinstance(value, Mapping) else value
    raise PolicyError(f'{field} must map each of {list(categories.CATEGORY_IDS)} to a number. '
                      f'Found {found!r}.')
  return {c: value[c] for c in categories.CATEGORY_IDS}


def calibrate_shared_noise(splits: Mapping[str, calibration.AdaptiveClipSplit],
                           combination_weights: Optional[Mapping[str, float]] = None,
                           category_fractions: Optional[Mapping[str, float]] = None
                          ) -> SharedNoiseCalibration:
  """The mechanism's constants from each category's split (`shared_noise_splits`).

  Args:
    splits: {category: AdaptiveClipSplit}, all six, one clipped_count_stddev and one
      expected_clients_per_round (one count, one client sample).
    combination_weights: w_c, positive (a category to leave out is frozen instead: a zero weight
      would need an infinite clip). Default 1.0 each.
    category_fractions: Non-negative weights of the mean that defines s (IDP-SGD: the groups'
      data fractions); default uniform. Public figures only: they set the clips, not the noise.

  Returns:
    The SharedNoiseCalibration.
  """
  calibration.check_category_splits(splits)
  stddevs = {c: splits[c].clipped_count_stddev for c in categories.CATEGORY_IDS}
  if len(set(stddevs.values())) != 1:
    raise PolicyError('splits must all have the same clipped_count_stddev for shared noise (one '
                      f'clipped count serves every category). Found {stddevs}.')
  clients = {c: splits[c].expected_clients_per_round for c in categories.CATEGORY_IDS}
  if len(set(clients.values())) != 1:
    raise PolicyError('splits must all have the same expected_clients_per_round (one client '
                      f'sample serves every category). Found {clients}.')
  weights = _all_categories('combination_weights', combination_weights or
                            {c: 1.0 for c in categories.CATEGORY_IDS})
  for c, w in weights.items():
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (math.isfinite(w) and
                                                                     w > 0):
      raise PolicyError(f'combination_weights[{c}] must be positive for shared noise (freeze a '
                        f'category to leave it out). Found {w!r}.')
  fractions = _all_categories('category_fractions', category_fractions or
                              {c: 1.0 for c in categories.CATEGORY_IDS})
  if any(isinstance(f, bool) or not isinstance(f, numbers.Real) or not (math.isfinite(f) and
                                                                        f >= 0)
         for f in fractions.values()) or sum(fractions.values()) <= 0:
    raise PolicyError('category_fractions must be non-negative with a positive sum. '
                      f'Found {fractions!r}.')
  total = float(sum(fractions.values()))
  value_z = {c: splits[c].value_noise_multiplier for c in categories.CATEGORY_IDS}
  scale = sum(fractions[c] / total * weights[c] * value_z[c] for c in categories.CATEGORY_IDS)
  return SharedNoiseCalibration(
      noise_multipliers={c: splits[c].noise_multiplier for c in categories.CATEGORY_IDS},
      value_noise_multipliers=value_z,
      combination_weights={c: float(weights[c]) for c in categories.CATEGORY_IDS},
      noise_scale=float(scale),
      clip_ratios={c: scale / (weights[c] * value_z[c]) for c in categories.CATEGORY_IDS},
      clipped_count_stddev=float(splits[categories.CATEGORY_IDS[0]].clipped_count_stddev),
      expected_clients_per_round=float(clients[categories.CATEGORY_IDS[0]]))
