"""How much of a round one malicious site controls, measured on the real encoder and decoder.

The setting and what each figure means: docs/DESIGN.md.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from tff_medical.crosssilo import mechanism


@dataclasses.dataclass(frozen=True)
class Influence:
  sites: int
  before: float
  at_max: float
  honest_at_max: float
  own_client: float
  attacker_norm: float
  honest_norm: float
  honest_cosine: float


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v)


def _ball(v: np.ndarray, radius: float) -> np.ndarray:
  norm = np.linalg.norm(v)
  return v * (radius / norm) if norm > radius else v


def _cos(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _decode(total: np.ndarray, seed: int, d: int, n: int) -> np.ndarray:
  unit_sum, _ = mechanism.decode_unit_sum(total, seed, d, n)
  return _ball(unit_sum, float(n))  # Radius max_sites x C, as decode_secure_sum.


def measure_once(n: int, d: int, rng: np.random.Generator) -> Influence:
  g = _unit(rng.normal(size=d))
  honest = [_unit(g + _unit(rng.normal(size=d))) for _ in range(n - 1)]
  seed = int(rng.integers(0, 2**62))
  # Before: no rotation, update / C clipped per coordinate, decoded sum projected on radius n.
  signs = rng.choice([-1.0, 1.0], d)
  old = sum(np.clip(h, -1, 1) for h in honest) + signs
  before = _cos(_ball(old, float(n)), signs)
  encoded = [mechanism.encode_unit_vector(h, seed) for h in honest]
  attack = rng.choice([-1.0, 1.0], encoded[0].shape[0]) * mechanism.CLIPPING_RANGE
  w = _unit(mechanism.decode_unit_sum(attack, seed, d, n)[0])
  honest_sum = sum(encoded)
  with_attack = _decode(honest_sum + attack, seed, d, n)
  without = _decode(honest_sum, seed, d, n)
  with_honest = _decode(honest_sum + mechanism.encode_unit_vector(w, seed), seed, d, n)
  own = _decode(honest_sum + 2 * n * attack, seed, d, n)
  alone = [mechanism.decode_unit_sum(e, seed, d, n)[0] for e in encoded]
  return Influence(
      n, before, _cos(with_attack, w), _cos(with_honest, w), _cos(own, w),
      float(np.linalg.norm(with_attack - without)),
      float(np.mean([np.linalg.norm(a) for a in alone])),
      float(np.mean([_cos(a, h) for a, h in zip(alone, honest)])))


def measure(n: int, d: int = 1350, trials: int = 20, seed: int = 0) -> Influence:
  """Each figure averaged over `trials` draws (attacker_norm: the largest)."""
  rng = np.random.default_rng([seed, n, d])
  runs = [measure_once(n, d, rng) for _ in range(trials)]
  mean = {f.name: float(np.mean([getattr(r, f.name) for r in runs]))
          for f in dataclasses.fields(Influence) if f.name != 'sites'}
  mean['attacker_norm'] = max(r.attacker_norm for r in runs)
  return Influence(sites=n, **mean)


def count_reach(n: int) -> dict[str, float]:
  """How far one site moves the round's clipped-count sum (the adaptive clip's input), when the
  n - 1 honest sites are all clipped (bit sum -(n-1)/2): within Flower's range and with its own
  client. An honest site moves it by at most 1."""
  honest = -(n - 1) * 0.5
  in_range = mechanism.CLIPPING_RANGE / (2 * mechanism.CLIPPING_RANGE)  # +1 sent = +0.5.
  own_client = 0.5 * n  # decode_secure_sum clamps the bit sum to [-n/2, n/2].
  return {'at_max': (honest + in_range) - (honest - 0.5),
          'own_client': own_client - (honest - 0.5)}


def table(sites: Sequence[int], d: int, trials: int) -> str:
  lines = ['| sites | before | at its max now | one honest site at its max | own SecAgg+ '
           'client | added norm (clip norms) | count moved (at max / own client) |',
           '|---|---|---|---|---|---|---|']
  honest = None
  for n in sites:
    m = measure(n, d, trials)
    reach = count_reach(n)
    honest = m
    lines.append(f'| {n} | {m.before:.1%} | {m.at_max:.1%} | {m.honest_at_max:.1%} | '
                 f'{m.own_client:.1%} | {m.attacker_norm:.3f} | '
                 f'{reach["at_max"]:g} / {reach["own_client"]:g} |')
  if honest is not None:
    lines.append(f'\nAn honest clipped update after the encoding: norm {honest.honest_norm:.2f} '
                 f'of the clip norm, cosine {honest.honest_cosine:.3f} ({d} weights, '
                 f'{trials} draws).')
  return '\n'.join(lines)
