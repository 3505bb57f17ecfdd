"""The privacy policy is data: the seed file loads, and each kind of bad field is refused."""

import copy
import json
import os
import signal

import pytest

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import policy as policy_lib


def _seed_dict():
  with open(policy_lib.DEFAULT_POLICY_PATH) as f:
    return json.load(f)


def test_seed_policy_values():
  policy = policy_lib.default_policy()
  assert [b.id for b in policy.budgets] == list(categories.CATEGORY_IDS)
  assert policy.epsilons == (0.5, 0.5, 1.0, 1.0, 2.0, 2.0)
  assert policy.delta == 1e-5
  assert [b.display_name for b in policy.budgets] == [
      'Head CT', 'Breast MRI', 'Abdomen CT', 'Chest CT', 'CXR (X-ray)', 'Hand X-ray']
  assert [b.privacy_level.value for b in policy.budgets] == [
      'High', 'High', 'Medium', 'Medium', 'Low', 'Low']
  assert policy.budget('CXR').noise_level == 'Minimal noise'


def test_user_policy_file_in_any_order(tmp_path):
  raw = _seed_dict()
  raw['categories'].reverse()
  raw['categories'][0]['epsilon'] = 3.0  # Hand, listed first now
  path = tmp_path / 'policy.json'
  path.write_text(json.dumps(raw))
  policy = policy_lib.load_policy(str(path))
  assert [b.id for b in policy.budgets] == list(categories.CATEGORY_IDS)
  assert policy.budget('Hand').epsilon == 3.0


_DELTA_RULE = 'delta must be a number in (0, 0.001] (well below 1/number of clients).'


def test_largest_allowed_delta_is_accepted():
  assert policy_lib.policy_from_dict(dict(_seed_dict(), delta=1e-3)).delta == 1e-3


def _mutate(fn):
  raw = copy.deepcopy(_seed_dict())
  fn(raw)
  return raw


def _set_epsilon(value):
  return lambda raw: raw['categories'][0].__setitem__('epsilon', value)


@pytest.mark.parametrize('mutation, message', [
    (_set_epsilon(0), 'HeadCT.epsilon must be a positive number. Found 0.'),
    (_set_epsilon(-1.0), 'HeadCT.epsilon must be a positive number. Found -1.0.'),
    (_set_epsilon('half'), "HeadCT.epsilon must be a positive number. Found 'half'."),
    (_set_epsilon(float('nan')), 'HeadCT.epsilon must be a positive number. Found nan.'),
    (_set_epsilon(True), 'HeadCT.epsilon must be a positive number. Found True.'),
    (_set_epsilon(None), 'HeadCT.epsilon must be a positive number. Found None.'),
    (lambda raw: raw.__setitem__('delta', 0), f'{_DELTA_RULE} Found 0.'),
    (lambda raw: raw.__setitem__('delta', 1.0), f'{_DELTA_RULE} Found 1.0.'),
    (lambda raw: raw.__setitem__('delta', 0.99), f'{_DELTA_RULE} Found 0.99.'),
    (lambda raw: raw.__setitem__('delta', 0.0011), f'{_DELTA_RULE} Found 0.0011.'),
    (lambda raw: raw.pop('delta'), f'{_DELTA_RULE} Found None.'),
    (lambda raw: raw['categories'].pop(1),
     'categories must list all six categories. Found none for BreastMRI.'),
    (lambda raw: raw['categories'][1].__setitem__('id', 'Knee'),
     "categories[].id must be one of HeadCT, BreastMRI, AbdomenCT, ChestCT, CXR, Hand. "
     "Found 'Knee'."),
    (lambda raw: raw['categories'].append(dict(raw['categories'][0])),
     "categories[].id must be unique. Found 'HeadCT' twice."),
    (lambda raw: raw['categories'][0].__setitem__('privacy_level', 'Extreme'),
     "HeadCT.privacy_level must be one of High, Medium, Low. Found 'Extreme'."),
    (lambda raw: raw.__setitem__('categories', {}),
     'categories must be a list of category entries. Found {}.'),
], ids=['eps_zero', 'eps_negative', 'eps_text', 'eps_nan', 'eps_bool', 'eps_missing',
        'delta_zero', 'delta_one', 'delta_0.99', 'delta_above_1e-3', 'delta_missing', 'category_missing', 'category_unknown',
        'category_duplicate', 'level_unknown', 'categories_not_list'])
def test_invalid_policy_is_refused_naming_field_and_value(mutation, message):
  with pytest.raises(PolicyError) as error:
    policy_lib.policy_from_dict(_mutate(mutation))
  assert str(error.value) == message


def test_unreadable_policy_files(tmp_path):
  with pytest.raises(PolicyError, match='Found no file at'):
    policy_lib.load_policy(str(tmp_path / 'missing.json'))
  broken = tmp_path / 'broken.json'
  broken.write_text('{"delta": ')
  with pytest.raises(PolicyError, match='must be valid JSON'):
    policy_lib.load_policy(str(broken))


def test_policy_path_that_is_not_a_readable_json_file_is_one_clear_error(tmp_path):
  latin1 = tmp_path / 'latin1.json'
  latin1.write_bytes(json.dumps(_seed_dict()).replace('Head CT', 'T\u00eate').encode('latin-1'))
  deep = tmp_path / 'deep.json'
  deep.write_text('[' * 100_000)
  big = tmp_path / 'big.json'
  big.write_bytes(b' ' * (2 << 20))
  os.mkfifo(tmp_path / 'pipe.json')
  cases = [
      (latin1, f'policy file must be UTF-8 JSON. Found a byte that is not UTF-8 at offset '
               f'{latin1.read_bytes().index(0xea)} of {latin1}.'),
      (tmp_path, f'policy file must be a regular file. Found {tmp_path}, which is not '
                 '(a folder?).'),
      (tmp_path / 'pipe.json', f'policy file must be a regular file. Found '
                               f'{tmp_path / "pipe.json"}, which is not (a folder?).'),
      (deep, f'policy file must be valid JSON. Found nesting too deep in {deep}.'),
      (big, f'policy file must be at most 1048576 bytes. Found a larger file at {big}.'),
  ]
  def expire(*_):
    raise AssertionError('load_policy blocked (opened the FIFO?)')

  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(10)
  try:
    for path, message in cases:
      with pytest.raises(PolicyError) as error:
        policy_lib.load_policy(str(path))
      assert str(error.value) == message
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_scaled_policy():
  scaled = policy_lib.default_policy().scaled(0.5)
  assert scaled.epsilons == (0.25, 0.25, 0.5, 0.5, 1.0, 1.0)
  with pytest.raises(PolicyError):
    policy_lib.default_policy().scaled(0)
