"""Tests for tff_medical.privacy.sampling: statistics, determinism, resume, validation."""

import json
import math
import time

import numpy as np
import pytest

from tff_medical.errors import PolicyError
from tff_medical.privacy import sampling
from tff_medical.privacy.sampling import FixedSizeSampler
from tff_medical.privacy.sampling import PoissonSampler
from tff_medical.privacy.sampling import SamplingMethod
from tff_medical.privacy.sampling import SamplingSpec

N, M, ROUNDS = 2000, 100, 2000
Q = M / N


def _inclusion_counts(sampler, rounds):
  counts = np.zeros(sampler.total_clients, dtype=np.int64)
  sizes = []
  for r in range(rounds):
    chosen = sampler.sample(r)
    counts[chosen] += 1
    sizes.append(len(chosen))
  return counts, np.array(sizes)


def _chi_square_z(counts, rounds, rate):
  """(statistic - N) / sqrt(2N) for per-client counts ~ Binomial(rounds, rate)."""
  expected = rounds * rate
  statistic = np.sum((counts - expected)**2 / (expected * (1 - rate)))
  return (statistic - len(counts)) / math.sqrt(2 * len(counts))


def test_poisson_sample_size_is_binomial():
  _, sizes = _inclusion_counts(PoissonSampler(N, M, seed=1), ROUNDS)
  variance = N * Q * (1 - Q)
  assert abs(sizes.mean() - M) < 5 * math.sqrt(variance / ROUNDS)
  # Sample variance has relative stddev ~ sqrt(2 / (R - 1)) ~ 3%.
  assert sizes.var(ddof=1) == pytest.approx(variance, rel=5 * math.sqrt(2 / (ROUNDS - 1)))
  assert len(set(sizes.tolist())) > 10  # Sizes vary: not a fixed-size sample in disguise.


def test_poisson_inclusion_is_uniform_and_independent_across_rounds():
  sampler = PoissonSampler(N, M, seed=2)
  counts, _ = _inclusion_counts(sampler, ROUNDS)
  assert abs(_chi_square_z(counts, ROUNDS, Q)) < 5
  # Consecutive rounds overlap by N q^2 on average, as independent draws do.
  overlaps = [len(np.intersect1d(sampler.sample(r), sampler.sample(r + 1))) for r in range(300)]
  assert np.mean(overlaps) == pytest.approx(N * Q * Q, abs=5 * math.sqrt(N * Q * Q / 300))


def test_fixed_size_sample_is_exact_distinct_sorted_and_uniform():
  sampler = FixedSizeSampler(N, M, seed=3)
  for r in range(50):
    chosen = sampler.sample(r)
    assert len(chosen) == M
    assert len(np.unique(chosen)) == M
    assert np.all(np.diff(chosen) > 0)
    assert chosen.min() >= 0 and chosen.max() < N
  counts, sizes = _inclusion_counts(sampler, ROUNDS)
  assert np.all(sizes == M)
  assert abs(_chi_square_z(counts, ROUNDS, Q)) < 6


@pytest.mark.parametrize('sampler_class', [PoissonSampler, FixedSizeSampler])
def test_sample_is_a_function_of_seed_and_round(sampler_class):
  sampler = sampler_class(N, M, seed=7)
  forward = [sampler.sample(r) for r in range(10)]
  backward = [sampler.sample(r) for r in reversed(range(10))][::-1]
  for a, b in zip(forward, backward):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(sampler.sample(0), sampler.sample(1))
  assert not np.array_equal(sampler.sample(0), sampler_class(N, M, seed=8).sample(0))
  assert sampler.sample(0).dtype == np.int64


@pytest.mark.parametrize('sampler_class', [PoissonSampler, FixedSizeSampler])
def test_resume_from_state_draws_the_same_samples(sampler_class):
  sampler = sampler_class(N, M, seed=11)
  state = json.loads(json.dumps(sampler.state()))
  assert state == {'method': sampler_class.METHOD.value, 'total_clients': N,
                   'expected_clients_per_round': M, 'seed': 11}
  for resumed in (sampler_class.from_state(state, sampler.spec),
                  sampling.sampler_from_state(state)):
    assert type(resumed) is sampler_class
    for r in (0, 5, 1234):
      np.testing.assert_array_equal(resumed.sample(r), sampler.sample(r))


def test_from_state_refuses_a_mismatch():
  state = PoissonSampler(N, M, seed=1).state()
  with pytest.raises(PolicyError, match=r'expected_clients_per_round: 100 vs 50'):
    PoissonSampler.from_state(state, SamplingSpec('poisson', N, 50))
  with pytest.raises(PolicyError, match=r"method: 'poisson' vs 'fixed_size'"):
    sampling.sampler_from_state(state, SamplingSpec('fixed_size', N, M))
  with pytest.raises(PolicyError, match="sampler state method must be 'fixed_size'"):
    FixedSizeSampler.from_state(state)
  with pytest.raises(PolicyError, match='seed must be a non-negative integer'):
    PoissonSampler.from_state(dict(state, seed=None))


def test_poisson_is_fast_at_mednist_scale():
  sampler = PoissonSampler(59_000, 590, seed=0)
  start = time.perf_counter()
  sizes = [len(sampler.sample(r)) for r in range(200)]
  elapsed = time.perf_counter() - start
  assert elapsed < 2.0  # ~1 ms a round; a per-client Python loop would take ~20 ms.
  assert abs(np.mean(sizes) - 590) < 5 * math.sqrt(590 / 200)


def test_everyone_sampled_when_m_equals_n():
  np.testing.assert_array_equal(PoissonSampler(10, 10, 0).sample(3), np.arange(10))
  np.testing.assert_array_equal(FixedSizeSampler(10, 10, 0).sample(3), np.arange(10))


def test_spec_rate_and_make_sampler():
  spec = SamplingSpec('fixed_size', 59_000, 590)
  assert spec.method is SamplingMethod.FIXED_SIZE
  assert spec.rate == pytest.approx(0.01)
  assert sampling.make_sampler(spec, seed=4).rate == pytest.approx(0.01)
  assert isinstance(sampling.make_sampler(spec, seed=4), FixedSizeSampler)
  assert SamplingSpec.from_json_dict(spec.to_json_dict()) == spec


@pytest.mark.parametrize('args, message', [
    pytest.param((0, 1, 0), 'total_clients must be a positive integer. Found 0.', id='n_zero'),
    pytest.param((10, 0, 0), 'expected_clients_per_round must be a positive integer. Found 0.',
                 id='m_zero'),
    pytest.param((10, 11, 0), r'expected_clients_per_round must be at most total_clients \(10\). '
                 'Found 11.', id='m_above_n'),
    pytest.param((10.0, 5, 0), 'total_clients must be a positive integer. Found 10.0.',
                 id='n_float'),
    pytest.param((10, True, 0), 'expected_clients_per_round must be a positive integer. '
                 'Found True.', id='m_bool'),
    pytest.param((10, 5, -1), 'seed must be a non-negative integer. Found -1.', id='seed'),
])
@pytest.mark.parametrize('sampler_class', [PoissonSampler, FixedSizeSampler])
def test_validation(sampler_class, args, message):
  with pytest.raises(PolicyError, match=message):
    sampler_class(*args)


def test_round_and_method_validation():
  with pytest.raises(PolicyError, match='round_num must be a non-negative integer. Found -1.'):
    PoissonSampler(10, 5, 0).sample(-1)
  with pytest.raises(PolicyError, match="sampling method must be one of poisson, fixed_size. "
                     "Found 'uniform'."):
    SamplingSpec('uniform', 10, 5)
