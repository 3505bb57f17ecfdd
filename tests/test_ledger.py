"""Tests for tff_medical.privacy.ledger: spend, freezing, JSON, state, atomic save."""

import copy
import json
import os
import time

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import numpy as np
import pytest

from tff_medical import categories
from tff_medical import fileio
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy.ledger import PrivacyLedger
from tff_medical.privacy.sampling import SamplingSpec

from helpers import reference_epsilon  # pylint: disable=g-bad-import-order

POLICY = policy_lib.default_policy()
SAMPLING = SamplingSpec('poisson', 1000, 100)
# Multipliers such that the budgets (0.5 / 1 / 2) last a handful of rounds at q = 0.1.
SHORT_RUN = {'HeadCT': 3.0, 'BreastMRI': 3.0, 'AbdomenCT': 2.0, 'ChestCT': 2.0, 'CXR': 1.5,
             'Hand': 1.5}


def gaussians(zs):
  return {c: dp_accounting.GaussianDpEvent(z) for c, z in zs.items()}


def raw_tff_event(z, clients_per_round=100):
  """The event TFF's gaussian_adaptive records: value and count (2 s) Gaussians, float32."""
  split = calibration.choose_clipped_count_stddev(z, clients_per_round)
  return dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(np.float32(split.value_noise_multiplier)),
      dp_accounting.GaussianDpEvent(np.float32(2 * split.clipped_count_stddev)),
  ])


def tff_like(z, clients_per_round=100):
  """What class_aware.dp_events reports: TFF's event converted to the per-category Gaussian."""
  return accounting.category_event(raw_tff_event(z, clients_per_round))


@pytest.mark.parametrize('total, per_round, rounds, delta', [
    pytest.param(1000, 100, 3, 1e-5, id='q0.1_r3'),
    pytest.param(59_000, 590, 2, 1e-6, id='q0.01_r2_delta1e-6'),
])
def test_epsilon_spent_equals_independent_dp_accounting(total, per_round, rounds, delta):
  policy = policy_lib.policy_from_dict(dict(POLICY.to_json_dict(), delta=delta))
  sampling = SamplingSpec('poisson', total, per_round)
  ledger = PrivacyLedger(policy, SHORT_RUN, sampling)
  for _ in range(rounds):
    ledger.record_round(gaussians(SHORT_RUN))
  references = {z: reference_epsilon([(sampling.rate, z, rounds)], delta)
                for z in set(SHORT_RUN.values())}
  for c, z in SHORT_RUN.items():
    assert ledger.epsilon_spent(c) == pytest.approx(references[z], rel=1e-9)
    assert ledger.rounds_released(c) == rounds
  # Client level: one sampled event per round over all six categories' Gaussians.
  client = rdp.RdpAccountant()
  for _ in range(rounds):
    client.compose(dp_accounting.PoissonSampledDpEvent(
        sampling.rate, dp_accounting.ComposedDpEvent(list(gaussians(SHORT_RUN).values()))))
  assert ledger.client_level_epsilon == pytest.approx(client.get_epsilon(delta), rel=1e-9)


def test_tff_events_are_accounted_at_their_effective_multiplier():
  ledger = PrivacyLedger(POLICY, SHORT_RUN, SAMPLING)
  ledger.record_round({c: tff_like(z) for c, z in SHORT_RUN.items()})
  for c, z in SHORT_RUN.items():
    assert ledger.noise_multiplier(c) == pytest.approx(z, rel=1e-6)
    assert ledger.epsilon_spent(c) == pytest.approx(
        reference_epsilon([(0.1, z, 1)], POLICY.delta), rel=1e-5)


def test_fixed_size_ledger_uses_replace_one():
  sampling = SamplingSpec('fixed_size', 1000, 100)
  # Replace-one needs about twice the noise of add-or-remove-one.
  zs = {c: 9.0 for c in categories.CATEGORY_IDS}
  ledger = PrivacyLedger(POLICY, zs, sampling)
  assert ledger.releasable() == categories.CATEGORY_IDS
  ledger.record_round(gaussians(zs))
  assert ledger.to_json_dict()['neighboring_relation'] == 'replace_one'
  for c, z in zs.items():
    assert ledger.epsilon_spent(c) == pytest.approx(
        reference_epsilon([(0.1, z, 1)], POLICY.delta, fixed_size=(1000, 100)), rel=1e-9)


def test_pld_ledger_equals_pld_accountant():
  ledger = PrivacyLedger(POLICY, SHORT_RUN, SAMPLING, accountant='pld')
  ledger.record_round({'CXR': dp_accounting.GaussianDpEvent(1.5)})
  ledger.record_round({'CXR': dp_accounting.GaussianDpEvent(1.5)})
  reference = pld.PLDAccountant().compose(
      dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), 2)
  assert ledger.epsilon_spent('CXR') == pytest.approx(reference.get_epsilon(POLICY.delta),
                                                      rel=1e-9)
  assert ledger.to_json_dict()['accountant'] == 'pld'


def test_category_freezes_at_its_planned_round_and_stays_frozen():
  rounds = 6
  zs = calibration.calibrate_category_noise(POLICY, SAMPLING, rounds)
  ledger = PrivacyLedger(POLICY, zs, SAMPLING)
  for t in range(rounds + 3):
    releasable = ledger.releasable()
    assert releasable == (categories.CATEGORY_IDS if t < rounds else ())
    # TFF's float32 view of the planned multipliers still fits the planned rounds.
    ledger.record_round({c: tff_like(zs[c], 1000) for c in releasable})
    for c in categories.CATEGORY_IDS:
      assert ledger.epsilon_spent(c) <= POLICY.budget(c).epsilon
  assert ledger.all_exhausted
  assert ledger.rounds_completed == rounds + 3
  for c in categories.CATEGORY_IDS:
    assert ledger.rounds_released(c) == rounds
    assert ledger.status(c) is ledger_lib.CategoryStatus.EXHAUSTED
    # Exhausted means used up: within 1% of the budget.
    assert ledger.epsilon_spent(c) > 0.99 * POLICY.budget(c).epsilon

  before = json.dumps(ledger.state())
  with pytest.raises(PolicyError, match=r'events\[HeadCT\] must be None in round 10: the '
                     r'category is exhausted \(frozen after round 6'):
    ledger.record_round({'HeadCT': dp_accounting.GaussianDpEvent(zs['HeadCT'])})
  assert json.dumps(ledger.state()) == before  # Refused without recording anything.


def test_no_category_ever_exceeds_its_budget_in_a_long_irregular_run():
  rng = np.random.default_rng(0)
  ledger = PrivacyLedger(POLICY, SHORT_RUN, SAMPLING)
  spent_before = {c: 0.0 for c in categories.CATEGORY_IDS}
  patterns = [categories.CATEGORY_IDS, ('HeadCT', 'BreastMRI', 'CXR', 'Hand'), ('AbdomenCT',), ()]
  for _ in range(150):
    if ledger.all_exhausted:
      break
    # Release part of what is releasable, some rounds with more noise than planned.
    pattern = patterns[rng.integers(len(patterns))]
    released = [c for c in ledger.releasable() if c in pattern]
    extra = 1.0 if rng.random() < 0.7 else 1.5
    ledger.record_round({c: dp_accounting.GaussianDpEvent(SHORT_RUN[c] * extra)
                         for c in released})
    per_category = [ledger.epsilon_spent(c) for c in categories.CATEGORY_IDS]
    for c in categories.CATEGORY_IDS:
      assert ledger.epsilon_spent(c) <= POLICY.budget(c).epsilon
      assert ledger.epsilon_spent(c) >= spent_before[c]
      spent_before[c] = ledger.epsilon_spent(c)
    assert ledger.client_level_epsilon >= max(per_category)
    ledger_lib.validate_ledger_json(ledger.to_json_dict())
  assert ledger.all_exhausted


def test_record_round_refuses_an_overspending_event():
  ledger = PrivacyLedger(POLICY, SHORT_RUN, SAMPLING)
  ledger.record_round(gaussians(SHORT_RUN))
  before = json.dumps(ledger.state())
  # Less noise than planned: one such round would blow HeadCT's 0.5.
  with pytest.raises(PolicyError, match=r'events\[HeadCT\] must keep epsilon within 0.5 in '
                     r'round 2. Found noise multiplier 0.5'):
    ledger.record_round({'HeadCT': dp_accounting.GaussianDpEvent(0.5),
                         'CXR': dp_accounting.GaussianDpEvent(1.5)})
  assert json.dumps(ledger.state()) == before


@pytest.mark.parametrize('events, message', [
    pytest.param({'Knee': None}, r"events keys must be category ids .*Found \['Knee'\]",
                 id='unknown_category'),
    pytest.param({'CXR': dp_accounting.LaplaceDpEvent(1.0)},
                 r'events\[CXR\] must be a GaussianDpEvent \(convert', id='laplace'),
    # TFF's raw event reads the count at whole-client sensitivity: refused, not understated.
    pytest.param({'CXR': raw_tff_event(1.5)},
                 r'events\[CXR\] must be a GaussianDpEvent \(convert TFF\'s event with '
                 r'accounting.category_event\). Found ComposedDpEvent', id='raw_tff_event'),
    pytest.param({'CXR': dp_accounting.GaussianDpEvent(0.0)},
                 r'events\[CXR\]: GaussianDpEvent.noise_multiplier must be positive',
                 id='zero_noise'),
    pytest.param({'CXR': 1.5}, r'events\[CXR\] must be a CategoryRoundEvents, a DpEvent or None. Found 1.5.',
                 id='not_an_event'),
])
def test_record_round_validation(events, message):
  with pytest.raises(PolicyError, match=message):
    PrivacyLedger(POLICY, SHORT_RUN, SAMPLING).record_round(events)


def test_noop_event_spends_nothing():
  ledger = PrivacyLedger(POLICY, SHORT_RUN, SAMPLING)
  ledger.record_round({'CXR': dp_accounting.NoOpDpEvent()})
  assert ledger.rounds_completed == 1
  assert ledger.rounds_released('CXR') == 0
  assert ledger.epsilon_spent('CXR') == 0.0 and ledger.client_level_epsilon == 0.0


def test_a_category_too_noisy_for_one_round_is_frozen_from_the_start():
  zs = dict(SHORT_RUN, HeadCT=0.2)
  ledger = PrivacyLedger(POLICY, zs, SAMPLING)
  assert 'HeadCT' not in ledger.releasable()
  assert ledger.to_json_dict()['categories']['HeadCT']['status'] == 'exhausted'


@pytest.mark.parametrize('kwargs, message', [
    pytest.param(dict(noise_multipliers={'CXR': 1.0}), 'noise_multipliers must have exactly the '
                 'six categories', id='missing'),
    pytest.param(dict(noise_multipliers=dict(SHORT_RUN, CXR=-1.0)),
                 r'noise_multipliers\[CXR\] must be positive. Found -1.0.', id='negative'),
    pytest.param(dict(sampling=SamplingSpec('fixed_size', 1000, 100), accountant='pld'),
                 'accountant must be rdp for fixed_size sampling', id='pld_fixed'),
    pytest.param(dict(accountant='gdp'), "accountant must be one of rdp, pld. Found 'gdp'.",
                 id='accountant'),
])
def test_constructor_validation(kwargs, message):
  args = dict(policy=POLICY, noise_multipliers=SHORT_RUN, sampling=SAMPLING)
  args.update(kwargs)
  with pytest.raises(PolicyError, match=message):
    PrivacyLedger(**args)


def _recorded_ledger(rounds=3):
  ledger = PrivacyLedger(POLICY, SHORT_RUN, SAMPLING)
  for t in range(rounds):
    released = ledger.releasable() if t != 1 else ('CXR',)
    ledger.record_round({c: dp_accounting.GaussianDpEvent(SHORT_RUN[c]) for c in released})
  return ledger


def test_json_has_the_published_shape():
  ledger = _recorded_ledger()
  payload = ledger.to_json_dict()
  ledger_lib.validate_ledger_json(payload)
  assert list(payload) == ['schema_version', 'accountant', 'privacy_unit',
                           'neighboring_relation', 'neighboring_relations', 'delta', 'sampling',
                           'rounds_completed', 'client_level_epsilon', 'categories',
                           'earlier_runs']
  assert payload['schema_version'] == 2
  assert payload['neighboring_relations'] == {
      'remove_category_examples':
          "adding or removing all of one client's category-c examples; the client stays",
      'remove_whole_client':
          'adding or removing one whole client whose only examples are category c',
      'client_level': 'adding or removing one whole client, whatever its categories'}
  assert payload['earlier_runs'] == []
  assert payload['privacy_unit'] == 'client'
  assert payload['neighboring_relation'] == 'add_or_remove_one'
  assert payload['sampling'] == {'method': 'poisson', 'total_clients': 1000,
                                 'expected_clients_per_round': 100, 'rate': 0.1}
  assert payload['rounds_completed'] == 3
  assert tuple(payload['categories']) == categories.CATEGORY_IDS
  assert payload['categories']['HeadCT'] == {
      'display_name': 'Head CT', 'privacy_level': 'High', 'target_epsilon': 0.5,
      'noise_multiplier': 3.0, 'rounds_released': ledger.rounds_released('HeadCT'),
      'epsilon_spent': ledger.epsilon_spent('HeadCT'),
      'epsilon_this_run': ledger.epsilon_spent('HeadCT'), 'status': ledger.status('HeadCT').value,
      # A bare Gaussian is the same round under both relations.
      'relations': {
          relation: {'epsilon': ledger.epsilon_spent('HeadCT'), 'noise_multiplier': 3.0,
                     'rounds': [[3.0, ledger.rounds_released('HeadCT')]]}
          for relation in ('remove_category_examples', 'remove_whole_client')}}
  assert payload['categories']['CXR']['rounds_released'] == 3
  assert json.loads(json.dumps(payload)) == payload


def _set(path, value):
  def mutate(d):
    *parents, last = path
    for key in parents:
      d = d[key]
    if value is KeyError:
      del d[last]
    else:
      d[last] = value
  return mutate


@pytest.mark.parametrize('mutate, message', [
    pytest.param(_set(['categories', 'HeadCT', 'epsilon_spent'], 0.6),
                 'epsilon_spent must not exceed target_epsilon', id='overspent'),
    pytest.param(_set(['categories', 'CXR', 'epsilon_spent'], 9.0),
                 'client_level_epsilon must be at least', id='client_below_category'),
    pytest.param(_set(['categories', 'Hand'], KeyError), 'categories must list', id='missing'),
    pytest.param(lambda d: d['categories'].update(Knee={}), 'categories must list',
                 id='extra_category'),
    pytest.param(lambda d: d.update(categories=dict(reversed(list(d['categories'].items())))),
                 'in that order', id='reordered'),
    pytest.param(_set(['sampling', 'rate'], 0.2), r'sampling.rate must be', id='rate'),
    pytest.param(_set(['neighboring_relation'], 'replace_one'),
                 'neighboring_relation must be add_or_remove_one', id='relation'),
    pytest.param(_set(['categories', 'CXR', 'status'], 'frozen'), 'status must be',
                 id='status'),
    pytest.param(_set(['categories', 'CXR', 'rounds_released'], 4), 'rounds_released must be',
                 id='released_after_end'),
    pytest.param(_set(['rounds_completed'], True), 'rounds_completed must be', id='bool'),
    pytest.param(_set(['schema_version'], 3), 'schema_version must be 1 or 2', id='schema'),
    # A version 1 ledger is read with its own shape: the version 2 keys are then unexpected.
    pytest.param(_set(['schema_version'], 1), 'unexpected', id='schema_1_with_version_2_keys'),
    pytest.param(_set(['client_level_epsilon'], float('nan')), 'client_level_epsilon must be',
                 id='nan'),
    pytest.param(_set(['categories', 'CXR', 'epsilon_spent'], 0), 'must be positive after',
                 id='released_but_free'),
    pytest.param(_set(['privacy_unit'], 'example'), 'privacy_unit must be client', id='unit'),
    pytest.param(_set(['extra'], 1), 'unexpected', id='extra_key'),
    pytest.param(_set(['categories', 'CXR', 'noise_multiplier'], KeyError), 'missing',
                 id='missing_field'),
    pytest.param(_set(['accountant'], 'pld'), None, id='valid_pld'),
])
def test_tampered_json_fails_validation(mutate, message):
  payload = copy.deepcopy(_recorded_ledger().to_json_dict())
  mutate(payload)
  if message is None:
    ledger_lib.validate_ledger_json(payload)
    return
  with pytest.raises(PolicyError, match=message):
    ledger_lib.validate_ledger_json(payload)


def test_state_round_trip_restores_an_identical_ledger():
  ledger = _recorded_ledger()
  state = json.loads(json.dumps(ledger.state()))
  restored = PrivacyLedger.from_state(state, POLICY, SAMPLING, 'rdp')
  assert restored.state() == ledger.state()
  assert restored.to_json_dict() == ledger.to_json_dict()
  next_round = {c: dp_accounting.GaussianDpEvent(SHORT_RUN[c]) for c in ledger.releasable()}
  assert restored.releasable() == ledger.releasable()
  ledger.record_round(next_round)
  restored.record_round(next_round)
  assert restored.to_json_dict() == ledger.to_json_dict()


def test_state_keeps_freezing_and_long_histories_cheaply():
  ledger = PrivacyLedger(POLICY, SHORT_RUN, SAMPLING)
  state = ledger.state()
  # 5,000 identical rounds of CXR alone, then 3,000 of nothing: two groups, not 8,000 events.
  policy = POLICY.scaled(100.0)
  state['policy'] = policy.to_json_dict()
  row = {c: None for c in categories.CATEGORY_IDS}
  state['history'] = [{'count': 5000, 'noise_multipliers': dict(row, CXR=20.0),
                       'whole_client_noise_multipliers': dict(row, CXR=20.0)},
                      {'count': 3000, 'noise_multipliers': row,
                       'whole_client_noise_multipliers': row}]
  state['frozen'] = {'HeadCT': 17}
  start = time.perf_counter()
  restored = PrivacyLedger.from_state(state, policy)
  assert time.perf_counter() - start < 20
  assert restored.rounds_completed == 8000
  assert restored.status('HeadCT') is ledger_lib.CategoryStatus.EXHAUSTED
  expected = rdp.RdpAccountant().compose(
      dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(20.0)), 5000)
  assert restored.epsilon_spent('CXR') == pytest.approx(expected.get_epsilon(POLICY.delta),
                                                        rel=1e-9)


@pytest.mark.parametrize('kwargs, message', [
    pytest.param(dict(policy=POLICY.scaled(2.0)), r'policy.HeadCT.epsilon: 0.5 vs 1.0',
                 id='policy'),
    pytest.param(dict(sampling=SamplingSpec('poisson', 1000, 50)),
                 'sampling.expected_clients_per_round: 100 vs 50', id='sampling'),
    pytest.param(dict(accountant='pld'), "accountant: 'rdp' vs 'pld'", id='accountant'),
])
def test_from_state_refuses_a_different_run(kwargs, message):
  args = dict(policy=POLICY)
  args.update(kwargs)
  with pytest.raises(PolicyError, match=message):
    PrivacyLedger.from_state(_recorded_ledger(1).state(), **args)


def test_from_state_refuses_a_tampered_history():
  state = _recorded_ledger(1).state()
  released = dict(state['history'][0]['noise_multipliers'])
  overspent = copy.deepcopy(state)
  overspent['history'][0]['count'] = 50
  with pytest.raises(PolicyError, match='must keep HeadCT within its budget 0.5'):
    PrivacyLedger.from_state(overspent, POLICY)
  after_freeze = copy.deepcopy(state)
  after_freeze['frozen'] = {'CXR': 0}
  with pytest.raises(PolicyError, match='must not release CXR after it was frozen in round 0'):
    PrivacyLedger.from_state(after_freeze, POLICY)
  bad_value = copy.deepcopy(state)
  bad_value['history'][0]['noise_multipliers'] = dict(released, CXR='1.5')
  with pytest.raises(PolicyError, match=r'noise_multipliers\[CXR\] must be positive'):
    PrivacyLedger.from_state(bad_value, POLICY)


def test_save_writes_valid_json_atomically(tmp_path, monkeypatch):
  ledger = _recorded_ledger()
  path = ledger.save(str(tmp_path))
  assert path == os.path.join(str(tmp_path), 'privacy_ledger.json')
  with open(path) as f:
    saved = json.load(f)
  assert saved == ledger.to_json_dict()
  ledger_lib.validate_ledger_json(saved)
  assert os.listdir(tmp_path) == ['privacy_ledger.json']

  # A failure while writing leaves the previous file whole and no temporary file behind.
  ledger.record_round({'CXR': dp_accounting.GaussianDpEvent(1.5)})

  def broken_write(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(fileio.os, 'fsync', broken_write)
  with pytest.raises(OSError, match='disk full'):
    ledger.save(str(tmp_path))
  monkeypatch.undo()
  with open(path) as f:
    assert json.load(f) == saved
  assert os.listdir(tmp_path) == ['privacy_ledger.json']

  # The new file appears only through os.replace of a fully written, synced temporary file.
  replaced = []
  real_replace, real_fsync = os.replace, os.fsync
  synced = []
  monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(fd), real_fsync(fd)))

  def recording_replace(src, dst):
    with open(src) as f:
      replaced.append((json.load(f), dst, len(synced)))
    real_replace(src, dst)

  monkeypatch.setattr(os, 'replace', recording_replace)
  ledger.save(str(tmp_path))
  assert replaced == [(ledger.to_json_dict(), path, 1)]
  with open(path) as f:
    assert json.load(f)['rounds_completed'] == 4
