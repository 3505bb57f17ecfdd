"""The run record's checkpoint store: round trip, retention, damage, TFF-written folders."""

import asyncio
import collections
import os
import stat

import numpy as np
import pytest
import tensorflow_federated as tff

from tff_medical import fileio
from tff_medical.errors import ConfigError
from tff_medical.training import run_record


def _state(round_num: int, weights_seed: int = 0):
  rng = np.random.default_rng(weights_seed)
  return collections.OrderedDict(
      learning=collections.OrderedDict(weights=[rng.normal(size=(3, 4)).astype(np.float32),
                                                np.float32(rng.normal())],
                                       flags=np.array([True, False])),
      round=np.int64(round_num), ledger='{"rounds": %d}' % round_num, secret=b'\x00\xffkey')


def _assert_equal_states(a, b):
  assert a.keys() == b.keys()
  np.testing.assert_array_equal(a['learning']['weights'][0], b['learning']['weights'][0])
  assert float(a['learning']['weights'][1]) == float(b['learning']['weights'][1])
  np.testing.assert_array_equal(a['learning']['flags'], b['learning']['flags'])
  assert int(a['round']) == int(b['round'])
  assert run_record.from_checkpoint(a['ledger']) == run_record.from_checkpoint(b['ledger'])
  assert bytes(a['secret']) == bytes(b['secret'])


def test_round_trip_keeps_every_value_and_only_the_newest_versions(tmp_path):
  store = run_record.CheckpointStore(str(tmp_path / 'checkpoints'), keep_total=2)
  for r in (1, 2, 3):
    store.save(_state(r, weights_seed=r), r)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['round_2', 'round_3']
  restored, version = store.load_latest(_state(0))
  assert version == 3
  _assert_equal_states(restored, _state(3, weights_seed=3))


def test_checkpoint_files_are_owner_only(tmp_path):
  with fileio.owner_only():
    run_record.CheckpointStore(str(tmp_path / 'checkpoints'), keep_total=2).save(_state(1), 1)
  for path in (tmp_path / 'checkpoints' / 'round_1', tmp_path / 'checkpoints' / 'round_1' /
               'state.npz'):
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path


def test_a_damaged_newest_version_falls_back_to_the_one_before(tmp_path):
  store = run_record.CheckpointStore(str(tmp_path / 'c'), keep_total=3)
  store.save(_state(1, 1), 1)
  store.save(_state(2, 2), 2)
  newest = tmp_path / 'c' / 'round_2' / 'state.npz'
  newest.write_bytes(newest.read_bytes()[:100])
  restored, version = store.load_latest(_state(0))
  assert version == 1
  _assert_equal_states(restored, _state(1, 1))


def test_a_state_of_another_shape_is_refused_not_restarted(tmp_path):
  store = run_record.CheckpointStore(str(tmp_path / 'c'), keep_total=3)
  store.save(_state(1), 1)
  other = _state(0)
  other['learning']['weights'][0] = np.zeros((5, 4), np.float32)
  with pytest.raises(ConfigError, match='none of its checkpoints'):
    store.load_latest(other)
  other = _state(0)
  other['extra'] = np.int64(0)
  with pytest.raises(ConfigError, match='none of its checkpoints'):
    store.load_latest(other)


def test_objects_are_refused_before_anything_is_written(tmp_path):
  store = run_record.CheckpointStore(str(tmp_path / 'c'), keep_total=3)
  state = _state(1)
  state['ledger'] = np.array([{'a': 1}], dtype=object)
  with pytest.raises(TypeError, match='arrays, numbers or strings'):
    store.save(state, 1)
  assert not (tmp_path / 'c').exists()


def test_folders_written_by_tffs_program_state_manager_are_still_read(tmp_path):
  root = str(tmp_path / 'c')
  manager = tff.program.FileProgramStateManager(root, prefix='round_', keep_total=3)
  asyncio.run(manager.save(_state(4, 4), 4))
  restored, version = run_record.CheckpointStore(root, keep_total=3).load_latest(_state(0))
  assert version == 4
  _assert_equal_states(restored, _state(4, 4))
