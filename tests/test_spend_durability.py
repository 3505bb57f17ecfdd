"""Spend is never rolled back, and a budget belongs to the data, not to one run.

A released round is recorded durably (budget registry, keyed audit log) before anything computed
from it is published; losing or corrupting checkpoints must never let those rounds be retrained
and released uncounted. Runs on the same real images compose their spend.
"""

import glob
import io
import json
import os
import re
import shutil

import numpy as np
from PIL import Image
import pytest

from tff_medical import categories
from tff_medical.data import phantoms
from tff_medical.errors import ConfigError
from tff_medical.privacy import budget_registry
from tff_medical.training import program
from tff_medical.training import run_record

from helpers import reference_epsilon  # pylint: disable=g-bad-import-order
from helpers import smoke_config  # pylint: disable=g-bad-import-order

# Every run here on the confined worker that ends with the session (not TFF's own default one).
pytestmark = pytest.mark.usefixtures('tff_context')


def _tree_digest(run_dir):
  """Every published file's bytes (the release surface), to prove a refused rerun wrote nothing."""
  found = {}
  for name in ('privacy_ledger.json', 'metrics.csv', 'audit_log.jsonl'):
    path = os.path.join(run_dir, name)
    with open(path, 'rb') as f:
      found[name] = f.read()
  return found


@pytest.fixture(scope='module')
def finished_and_interrupted(tmp_path_factory, smoke_run):
  result, finished = smoke_run  # The session's 4-round run, as it was before any test resumed it.
  assert result.rounds_completed == 4
  interrupted = str(tmp_path_factory.mktemp('durability') / 'interrupted')
  assert program.run(smoke_config(), interrupted, stop_after_rounds=3).rounds_completed == 3
  return {'finished': finished, 'interrupted': interrupted}


def _versions(run_dir):
  return sorted(glob.glob(os.path.join(run_dir, 'checkpoints', 'round_*')),
                key=lambda p: int(p.rsplit('_', 1)[1]))


def _delete_newest(run_dir):
  shutil.rmtree(_versions(run_dir)[-1])


def _delete_all(run_dir):
  shutil.rmtree(os.path.join(run_dir, 'checkpoints'))


def _truncate_newest(run_dir):
  for path in glob.glob(os.path.join(_versions(run_dir)[-1], '**', '*'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize('which', ['finished', 'interrupted'])
@pytest.mark.parametrize('damage', [_delete_newest, _delete_all, _truncate_newest],
                         ids=['newest_deleted', 'all_deleted', 'newest_truncated'])
def test_lost_checkpoint_never_yields_an_uncounted_release(finished_and_interrupted, tmp_path,
                                                          which, damage):
  run_dir = str(tmp_path / which)
  shutil.copytree(finished_and_interrupted[which], run_dir)
  before = _tree_digest(run_dir)
  released = json.loads(before['privacy_ledger.json'])['rounds_completed']
  damage(run_dir)
  with pytest.raises(ConfigError, match=f'round {released} was released .*newest readable '
                                        'checkpoint is'):
    program.run(smoke_config(), run_dir)
  # Refused before training: nothing published changed (no new model, no rolled-back ledger).
  assert _tree_digest(run_dir) == before
  assert not os.path.exists(os.path.join(run_dir, 'saved_model'))


# --- The budget registry: runs on the same real images compose. ----------------------------


def _write_mednist(root, per_category, seed=0):
  data = phantoms.generate(per_category, seed=seed)
  for i, (image, label) in enumerate(zip(data.images, data.labels)):
    folder = os.path.join(root, categories.CATEGORY_IDS[int(label)])
    os.makedirs(folder, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format='PNG')
    with open(os.path.join(folder, f'{i:06d}.png'), 'wb') as f:
      f.write(buffer.getvalue())
  return str(root)


def _mednist_config(data_dir, **overrides):
  return smoke_config(dataset='mednist', data_dir=data_dir, **overrides)


def _ledger(run_dir):
  with open(os.path.join(run_dir, 'privacy_ledger.json')) as f:
    return json.load(f)


@pytest.mark.slow  # End-to-end tier: three runs on real images, about 70 s.
def test_second_run_on_the_same_data_gets_what_is_left_and_a_third_is_refused(tmp_path):
  data_dir = _write_mednist(tmp_path / 'MedNIST', 40)
  first = str(tmp_path / 'first')
  program.run(_mednist_config(data_dir), first, stop_after_rounds=1)
  first_ledger = _ledger(first)
  second = str(tmp_path / 'second')
  result = program.run(_mednist_config(data_dir), second)
  assert result.rounds_completed >= 1
  ledger = _ledger(second)
  assert [run['rounds'] for run in ledger['earlier_runs']] == [1]
  rate = ledger['sampling']['rate']
  for c in categories.CATEGORY_IDS:
    entry = ledger['categories'][c]
    target = entry['target_epsilon']
    assert entry['epsilon_spent'] <= target + 1e-9
    assert entry['epsilon_this_run'] < entry['epsilon_spent']
    # The second run was calibrated to what the first left: more noise per round.
    assert entry['noise_multiplier'] > first_ledger['categories'][c]['noise_multiplier']
    for relation, figures in entry['relations'].items():
      earlier = first_ledger['categories'][c]['relations'][relation]['rounds']
      groups = [(rate, z, n) for z, n in earlier + figures['rounds']]
      assert figures['epsilon'] == pytest.approx(reference_epsilon(groups, ledger['delta']),
                                                 rel=1e-6)
  # Every budget is now (nearly) spent across the two runs: a third run is refused up front,
  # with the numbers, before it trains or writes a checkpoint.
  third = str(tmp_path / 'third')
  with pytest.raises(ConfigError, match=r'(?si)earlier runs on the same data.*HeadCT [0-9.]+ of '
                                        r'0\.5'):
    program.run(_mednist_config(data_dir), third)
  assert not os.path.exists(os.path.join(third, 'checkpoints'))


def test_non_private_run_on_real_data_needs_its_flag_and_ends_dp_on_that_data(tmp_path):
  data_dir = _write_mednist(tmp_path / 'MedNIST', 30, seed=3)
  with pytest.raises(ConfigError, match='release_non_private must be true'):
    program.run(_mednist_config(data_dir, dp=False), str(tmp_path / 'refused'))
  program.run(_mednist_config(data_dir, dp=False, release_non_private=True, total_rounds=1),
              str(tmp_path / 'plain'))
  with pytest.raises(ConfigError, match='non-private runs'):
    program.run(_mednist_config(data_dir), str(tmp_path / 'private_after'))


def test_registry_holds_no_path_and_no_client_id(tmp_path, budget_registry_dir):
  data_dir = _write_mednist(tmp_path / 'MedNIST', 20, seed=5)
  run_dir = str(tmp_path / 'run')
  program.run(_mednist_config(data_dir, total_rounds=1), run_dir)
  files = glob.glob(os.path.join(budget_registry_dir, '*.json'))
  assert files
  text = ''.join(open(p).read() for p in files)
  assert str(tmp_path) not in text, text
  assert not re.search(r'client_[0-9]', text), text
  assert all(os.stat(p).st_mode & 0o077 == 0 for p in files)


# --- The keyed audit log is checked on resume. ----------------------------------------------


def _rewrite_records(path, edit):
  """Edits records and recomputes every plain SHA-256 link, as an attacker without the key can."""
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    records = [json.loads(line) for line in f]
  records = edit(records)
  with open(path, 'w') as f:
    for record in records:
      record['mac'] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
      f.write(json.dumps(record, sort_keys=True) + '\n')


def _edit_middle(records):
  records[1]['participants'] = records[1]['participants'][:1]
  records[1]['epsilon_spent'] = {c: 0.0 for c in records[1]['epsilon_spent']}
  return records


def _drop_tail(records):
  return records[:-1]


def _lower_ledger(run_dir):
  path = os.path.join(run_dir, 'privacy_ledger.json')
  with open(path) as f:
    ledger = json.load(f)
  ledger['categories']['CXR']['epsilon_spent'] *= 0.5
  for figures in ledger['categories']['CXR']['relations'].values():
    figures['epsilon'] *= 0.5
  with open(path, 'w') as f:
    json.dump(ledger, f)


@pytest.mark.parametrize('tamper', ['edited_and_rehashed', 'tail_deleted', 'ledger_lowered'])
def test_resume_refuses_a_tampered_audit_log_or_ledger(finished_and_interrupted, tmp_path, tamper):
  from tff_medical.monitoring import audit as audit_lib  # pylint: disable=g-import-not-at-top
  source = finished_and_interrupted['interrupted']
  with open(os.path.join(source, 'audit_log.jsonl')) as f:
    first = json.loads(f.readline())
  assert first['notice'].startswith('CONFIDENTIAL') and 'sampling amplification' in first['notice']
  run_dir = str(tmp_path / 'run')
  shutil.copytree(source, run_dir)
  log = os.path.join(run_dir, 'audit_log.jsonl')
  if tamper == 'ledger_lowered':
    _lower_ledger(run_dir)
  else:
    _rewrite_records(log, _edit_middle if tamper == 'edited_and_rehashed' else _drop_tail)
  with pytest.raises(audit_lib.AuditError):
    program.run(smoke_config(), run_dir)
  assert not audit_lib.verify_run_dir(run_dir).ok


def test_a_killed_save_leaves_no_temporary_checkpoint_behind(tmp_path):
  """TFF saves round_N_tempNNNN and renames it when complete; a kill leaves the temp folder."""
  root = tmp_path / 'checkpoints'
  (root / 'round_3_temp4321' / 'variables').mkdir(parents=True)
  (root / 'round_3_temp4321' / 'variables' / 'variables.index').write_bytes(b'partial')
  (root / 'round_2').mkdir()
  run_record.CheckpointStore(str(root), keep_total=3)
  assert sorted(os.listdir(root)) == ['round_2']
