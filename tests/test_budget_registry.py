"""Tests for tff_medical.privacy.budget_registry: one budget per data set, never rolled back."""

import json
import math
import multiprocessing
import os
import stat

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import numpy as np
import pytest

from tff_medical import categories
from tff_medical import fileio
from tff_medical.errors import DataError
from tff_medical.errors import PolicyError
from tff_medical.privacy import budget_registry
from tff_medical.privacy.accounting import Accountant
from tff_medical.privacy.budget_registry import BudgetRegistry
from tff_medical.privacy.sampling import SamplingMethod
from tff_medical.privacy.sampling import SamplingSpec

DELTA = 1e-5
FP = 'ab' * 32
POISSON = SamplingSpec(SamplingMethod.POISSON, 1000, 50)
FIXED = SamplingSpec(SamplingMethod.FIXED_SIZE, 1000, 50)
EXAMPLES = budget_registry.Relation.REMOVE_CATEGORY_EXAMPLES.value
WHOLE = budget_registry.Relation.REMOVE_WHOLE_CLIENT.value


def spend(examples, whole=None, category='HeadCT'):
  return {category: {EXAMPLES: examples, WHOLE: whole if whole is not None else examples}}


def entry(rounds, groups, whole=None, sampling=POISSON, private=True,
          started='2024-05-01T10:00:00+00:00', accountant='rdp'):
  return {
      'private': private,
      'started': started,
      'rounds': rounds,
      'accountant': accountant,
      'sampling': sampling.to_json_dict() if sampling is not None else None,
      'spend': spend(groups, whole) if groups is not None else {},
  }


@pytest.fixture
def registry(tmp_path):
  return BudgetRegistry(tmp_path / 'registry', FP)


def images_and_labels(n=12, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 64, 64), dtype=np.uint8)
  labels = rng.integers(0, categories.NUM_CATEGORIES, n).astype(np.int32)
  return images, labels


# --- Fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_does_not_depend_on_order():
  images, labels = images_and_labels()
  order = np.random.default_rng(1).permutation(len(labels))
  key = budget_registry.dataset_fingerprint(images, labels)
  assert len(key) == 64 and int(key, 16) >= 0
  assert budget_registry.dataset_fingerprint(images[order], labels[order]) == key
  assert budget_registry.dataset_fingerprint(images, labels.astype(np.int64)) == key


@pytest.mark.parametrize('change', ['pixel', 'label', 'one_image_less', 'duplicate'])
def test_fingerprint_changes_with_the_data(change):
  images, labels = images_and_labels()
  key = budget_registry.dataset_fingerprint(images, labels)
  images, labels = images.copy(), labels.copy()
  if change == 'pixel':
    images[5, 31, 17] ^= 1
  elif change == 'label':
    labels[5] = (labels[5] + 1) % categories.NUM_CATEGORIES
  elif change == 'one_image_less':
    images, labels = images[1:], labels[1:]
  else:
    images, labels = np.concatenate([images, images[:1]]), np.concatenate([labels, labels[:1]])
  assert budget_registry.dataset_fingerprint(images, labels) != key


@pytest.mark.parametrize('images, labels', [
    pytest.param(np.zeros((2, 64, 64), np.float32), np.zeros(2, np.int32), id='float_images'),
    pytest.param(np.zeros((2, 32, 32), np.uint8), np.zeros(2, np.int32), id='wrong_size'),
    pytest.param(np.zeros((2, 64, 64), np.uint8), np.zeros(3, np.int32), id='label_count'),
    pytest.param(np.zeros((2, 64, 64), np.uint8), np.array([0, 6]), id='label_range'),
    pytest.param(np.zeros((0, 64, 64), np.uint8), np.zeros(0, np.int32), id='empty'),
])
def test_fingerprint_rejects_bad_arrays(images, labels):
  with pytest.raises(DataError, match='must be'):
    budget_registry.dataset_fingerprint(images, labels)


# --- Directory and file modes --------------------------------------------------------------------


def test_default_dir_from_environment_created_0700(tmp_path, monkeypatch):
  target = tmp_path / 'a' / 'registry'
  monkeypatch.setenv(budget_registry.REGISTRY_ENV, str(target))
  old = os.umask(0)
  try:
    assert budget_registry.default_registry_dir() == str(target)
  finally:
    os.umask(old)
  assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_default_dir_under_home(tmp_path, monkeypatch):
  monkeypatch.delenv(budget_registry.REGISTRY_ENV, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  directory = budget_registry.default_registry_dir()
  assert directory == str(tmp_path / '.local/share/tff_medical/budget_registry')
  assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_refuses_a_directory_others_can_write(tmp_path):
  shared = tmp_path / 'shared'
  shared.mkdir()
  os.chmod(shared, 0o777)
  with pytest.raises(PolicyError, match='must not be writable by group or others'):
    BudgetRegistry(shared, FP)


def test_files_are_0600_from_creation_whatever_the_umask(tmp_path, monkeypatch):
  seen = []
  real_fsync = os.fsync

  def observing_fsync(fd):
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):  # The data file, synced before it is renamed into place.
      seen.append(stat.S_IMODE(info.st_mode))
    return real_fsync(fd)

  monkeypatch.setattr(fileio.os, 'fsync', observing_fsync)
  old = os.umask(0)
  try:
    registry = BudgetRegistry(tmp_path / 'registry', FP)
    registry.record('run-1', entry(1, [[2.0, 1]]))
  finally:
    os.umask(old)
  assert seen == [0o600]
  assert stat.S_IMODE(os.stat(registry.path).st_mode) == 0o600
  assert stat.S_IMODE(os.stat(registry.path[:-len('.json')] + '.lock').st_mode) == 0o600
  assert stat.S_IMODE((tmp_path / 'registry').stat().st_mode) == 0o700
  assert sorted(os.listdir(tmp_path / 'registry')) == [f'{FP}.json', f'{FP}.lock']


def test_bad_fingerprint_is_refused(tmp_path):
  with pytest.raises(PolicyError, match='64 lowercase hex'):
    BudgetRegistry(tmp_path, '../../etc/passwd')


# --- Record, extend, refuse rollback -------------------------------------------------------------


def test_record_and_extend(registry):
  assert registry.entry('run-1') is None
  registry.record('run-1', entry(2, [[2.0, 2]]))
  stored = registry.record('run-1', entry(5, [[2.0, 3], [2.0, 1], [3.0, 1]]))
  assert stored['spend']['HeadCT'][EXAMPLES] == [[2.0, 4], [3.0, 1]]
  assert registry.entry('run-1') == stored
  content = json.loads(open(registry.path).read())
  assert content['schema_version'] == 1 and content['dataset_fingerprint'] == FP
  assert list(content['runs']) == ['run-1']
  registry.record('run-2', entry(1, [[1.5, 1]], started='2024-06-01T00:00:00+00:00'))
  assert [r for r, _ in registry.earlier('run-2')] == ['run-1']
  assert [r for r, _ in registry.earlier('run-3')] == ['run-1', 'run-2']


@pytest.mark.parametrize('update, message', [
    pytest.param(entry(2, [[2.0, 2]]), 'rounds must not go back', id='fewer_rounds'),
    pytest.param(entry(3, [[2.0, 1]]), 'must extend the recorded groups', id='fewer_in_group'),
    pytest.param(entry(3, [[2.5, 2], [3.0, 1]]), 'must extend', id='changed_multiplier'),
    pytest.param(entry(4, [[2.0, 2]]), 'must extend', id='dropped_group'),
    pytest.param(entry(4, [[2.0, 2], [3.0, 1]], whole=[]), 'must extend', id='dropped_relation'),
    pytest.param({**entry(4, None), 'spend': {}}, 'must extend', id='dropped_category'),
    pytest.param(entry(4, [[2.0, 2], [3.0, 1]], sampling=SamplingSpec('poisson', 2000, 50)),
                 'sampling must stay', id='changed_sampling'),
    pytest.param(entry(4, [[2.0, 2], [3.0, 1]], started='2030-01-01T00:00:00'),
                 'started must stay', id='changed_start'),
])
def test_rollback_is_refused_and_file_untouched(registry, update, message):
  registry.record('run-1', entry(3, [[2.0, 2], [3.0, 1]]))
  before = open(registry.path, 'rb').read()
  with pytest.raises(PolicyError, match=message):
    registry.record('run-1', update)
  assert open(registry.path, 'rb').read() == before


def test_non_private_run_cannot_become_private(registry):
  registry.record('plain', entry(3, None, private=False, sampling=None, accountant=None))
  before = open(registry.path, 'rb').read()
  with pytest.raises(PolicyError, match='private must stay false'):
    registry.record('plain', entry(3, None))
  assert open(registry.path, 'rb').read() == before
  # The other way is not a rollback: a run that released a non-private model counts as such.
  registry.record('dp', entry(3, [[2.0, 3]]))
  registry.record('dp', entry(3, [[2.0, 3]], private=False))
  assert registry.non_private_runs('x') == ['dp', 'plain']


@pytest.mark.parametrize('bad, message', [
    pytest.param({'run_dir': '/data/x'}, 'unknown', id='extra_key'),
    pytest.param({'rounds': -1}, 'rounds must be', id='negative_rounds'),
    pytest.param({'rounds': 1}, 'at most the run', id='more_spend_than_rounds'),
    pytest.param({'spend': {'HeadCT': {EXAMPLES: [[2.0, 2]]}}}, 'exactly the relations',
                 id='one_relation'),
    pytest.param({'spend': spend([[0.0, 2]])}, 'positive and finite', id='zero_noise'),
    pytest.param({'spend': spend([[2.0, 0]])}, 'positive integers', id='zero_count'),
    pytest.param({'spend': spend([[2.0, 1]], category='Knee')}, 'category ids', id='category'),
    pytest.param({'accountant': 'pld', 'sampling': FIXED.to_json_dict()}, 'must be rdp',
                 id='pld_fixed_size'),
    pytest.param({'started': 'yesterday'}, 'ISO 8601', id='started'),
    pytest.param({'private': 'yes'}, 'true or false', id='private'),
])
def test_invalid_entry_is_refused(registry, bad, message):
  with pytest.raises(PolicyError, match=message):
    registry.record('run-1', {**entry(2, [[2.0, 2]]), **bad})
  assert not os.path.exists(registry.path)


# --- Concurrency ---------------------------------------------------------------------------------


def _record_many(directory, worker, barrier, count):
  registry = BudgetRegistry(directory, FP)
  barrier.wait()
  for i in range(count):
    registry.record(f'w{worker}-{i}', entry(1, [[2.0, 1]]))


def test_concurrent_processes_keep_every_entry(tmp_path):
  directory = tmp_path / 'registry'
  BudgetRegistry(directory, FP)
  context = multiprocessing.get_context('fork')
  barrier = context.Barrier(2)
  count = 25
  workers = [context.Process(target=_record_many, args=(directory, w, barrier, count))
             for w in range(2)]
  for p in workers:
    p.start()
  for p in workers:
    p.join(60)
  assert [p.exitcode for p in workers] == [0, 0]
  runs = BudgetRegistry(directory, FP).runs()
  assert sorted(runs) == sorted(f'w{w}-{i}' for w in range(2) for i in range(count))


# --- Spend across runs ---------------------------------------------------------------------------


def direct_epsilon(runs, accountant=Accountant.RDP):
  """Independent: compose PoissonSampled(q, Gaussian(z)) with dp_accounting directly."""
  acc = (rdp.RdpAccountant() if accountant is Accountant.RDP else
         pld.PLDAccountant())
  for sampling, groups in runs:
    for z, count in groups:
      event = dp_accounting.PoissonSampledDpEvent(sampling.rate, dp_accounting.GaussianDpEvent(z))
      acc.compose(event, count)
  return acc.get_epsilon(DELTA)


@pytest.mark.parametrize('accountant', [Accountant.RDP, Accountant.PLD], ids=['rdp', 'pld'])
def test_spent_equals_direct_composition(registry, accountant):
  other = SamplingSpec(SamplingMethod.POISSON, 4000, 100)
  registry.record('a', entry(30, [[2.0, 20], [2.5, 10]], whole=[[1.9, 30]]))
  registry.record('b', entry(40, [[3.0, 40]], whole=[[3.0, 40]], sampling=other,
                             started='2024-06-01T00:00:00+00:00'))
  registry.record('current', entry(5, [[1.0, 5]]))  # Excluded: the run asking.
  examples = direct_epsilon([(POISSON, [(2.0, 20), (2.5, 10)]), (other, [(3.0, 40)])],
                            accountant)
  whole = direct_epsilon([(POISSON, [(1.9, 30)]), (other, [(3.0, 40)])], accountant)
  assert whole > examples  # So the max over relations is what is checked.
  got = registry.spent('current', 'HeadCT', DELTA, accountant)
  assert got == pytest.approx(whole, rel=1e-6)
  assert registry.spent('current', 'CXR', DELTA, accountant) == 0.0
  # The events are ready to compose with the current run's own.
  events = registry.prior_events('current', 'HeadCT', EXAMPLES, 'poisson')
  assert [count for _, count in events] == [20, 10, 40]
  assert all(isinstance(e, dp_accounting.PoissonSampledDpEvent) for e, _ in events)


def test_spent_with_fixed_size_sampling_matches_direct_rdp(registry):
  registry.record('a', entry(10, [[2.0, 10]], sampling=FIXED))
  acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(1000, 50,
                                                             dp_accounting.GaussianDpEvent(1.0)),
              10)
  assert registry.spent('b', 'HeadCT', DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)


def test_no_earlier_run_spends_nothing(registry):
  registry.record('only', entry(3, [[2.0, 3]]))
  assert registry.spent('only', 'HeadCT', DELTA) == 0.0
  assert registry.prior_events('only', 'HeadCT', WHOLE) == []


def test_non_private_run_makes_spend_infinite(registry):
  registry.record('dp', entry(3, [[2.0, 3]]))
  registry.record('plain', entry(3, None, private=False, sampling=None, accountant=None))
  assert registry.non_private_runs('dp') == ['plain']
  assert registry.spent('dp', 'CXR', DELTA) == math.inf
  assert registry.non_private_runs('plain') == []
  assert registry.spent('plain', 'HeadCT', DELTA) > 0


def test_mixed_sampling_methods_name_the_run(registry):
  registry.record('fixed-run', entry(3, [[2.0, 3]], sampling=FIXED))
  with pytest.raises(PolicyError, match="'fixed-run' with fixed_size"):
    registry.prior_events('new', 'HeadCT', EXAMPLES, SamplingMethod.POISSON)
  registry.record('poisson-run', entry(3, [[2.0, 3]], started='2024-07-01T00:00:00+00:00'))
  with pytest.raises(PolicyError, match="'poisson-run' with poisson"):
    registry.spent('new', 'HeadCT', DELTA)
  # Nothing spent on a category: nothing to compose, no conflict.
  assert registry.prior_events('new', 'CXR', EXAMPLES, 'poisson') == []


# --- Damaged files -------------------------------------------------------------------------------


@pytest.mark.parametrize('content', [
    pytest.param(b'{"schema_version": 1, "dataset_fi', id='truncated'),
    pytest.param(b'\xff\xfe', id='not_utf8'),
    pytest.param(b'[]', id='not_object'),
    pytest.param(json.dumps({'schema_version': 2, 'dataset_fingerprint': FP,
                             'runs': {}}).encode(), id='schema'),
    pytest.param(json.dumps({'schema_version': 1, 'dataset_fingerprint': 'cd' * 32,
                             'runs': {}}).encode(), id='other_dataset'),
    pytest.param(json.dumps({'schema_version': 1, 'dataset_fingerprint': FP,
                             'runs': {'r': {'private': True}}}).encode(), id='bad_entry'),
])
def test_corrupt_file_is_an_error_naming_it(registry, content):
  with open(registry.path, 'wb') as f:
    f.write(content)
  for call in (lambda: registry.spent('x', 'HeadCT', DELTA),
               lambda: registry.record('x', entry(1, [[2.0, 1]]))):
    with pytest.raises(PolicyError, match='never reset') as raised:
      call()
    assert registry.path in str(raised.value)
  assert open(registry.path, 'rb').read() == content


def test_symlinked_file_is_refused(registry, tmp_path):
  target = tmp_path / 'elsewhere.json'
  target.write_text('{}')
  os.symlink(target, registry.path)
  with pytest.raises(PolicyError, match='symbolic link'):
    registry.runs()
