"""The audit log: a valid chain verifies, every kind of tampering is caught at its line, a write
cut short is repaired, identifiers cannot enter a record, and the weights hash is exact."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tff_medical.monitoring import audit

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_REPO, 'experiments', 'verify_audit.py')


def _record(round_num: int) -> dict:
  return {
      'time': '2024-05-01T12:00:00Z',
      'round': round_num,
      'participants': [f'client_{round_num:05d}', f'client_{round_num + 100:05d}'],
      'num_participants': 2,
      'categories_released': ['HeadCT', 'CXR'],
      'clip_norms': {'HeadCT': 0.1, 'CXR': 0.25},
      'update_norm': 0.0123,
      'epsilon_spent': {'HeadCT': 0.01 * round_num, 'CXR': 0.02 * round_num},
      'client_level_epsilon': 0.03 * round_num,
      'model_sha256': audit.model_weights_sha256([np.full((2,), round_num, np.float32)]),
  }


@pytest.fixture
def log_path(tmp_path):
  """A valid log of rounds 1..5."""
  log = audit.AuditLog(tmp_path / audit.AUDIT_LOG_FILENAME)
  for r in range(1, 6):
    log.append(_record(r))
  return log.path


def _lines(path) -> list[str]:
  with open(path) as f:
    return f.read().splitlines(keepends=True)


def _write_lines(path, lines) -> None:
  with open(path, 'w') as f:
    f.writelines(lines)


def _rehash(record: dict) -> str:
  """A record line with a valid record_hash for its (possibly forged) contents."""
  record = dict(record)
  record['record_hash'] = audit.record_hash(record)
  return json.dumps(record, sort_keys=True, separators=(',', ':')) + '\n'


class TestChain:

  def test_valid_chain_verifies(self, log_path):
    result = audit.verify_chain(log_path)
    assert result == audit.VerifyResult(ok=True, records=5, first_bad_line=None, reason='')

  def test_records_are_chained_and_hashed(self, log_path):
    records = audit.AuditLog(log_path).records()
    assert [r['round'] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]['prev_hash'] == '0' * 64
    for prev, record in zip(records, records[1:]):
      assert record['prev_hash'] == prev['record_hash']
    for record in records:
      body = {k: v for k, v in record.items() if k != 'record_hash'}
      canonical = json.dumps(body, sort_keys=True, separators=(',', ':'))
      assert record['record_hash'] == hashlib.sha256(canonical.encode()).hexdigest()

  def test_last_record_and_round(self, log_path, tmp_path):
    log = audit.AuditLog(log_path)
    assert log.last_round() == 5
    assert log.last_record() == log.records()[-1]
    empty = audit.AuditLog(tmp_path / 'none.jsonl')
    assert empty.last_record() is None and empty.last_round() is None

  def test_time_defaults_to_utc_now(self, tmp_path):
    record = _record(1)
    del record['time']
    written = audit.AuditLog(tmp_path / 'a.jsonl').append(record)
    assert written['time'].endswith('Z')

  def test_numpy_numbers_are_accepted_as_plain_numbers(self, tmp_path):
    record = _record(1)
    record['round'] = np.int64(1)
    record['update_norm'] = np.float32(0.5)
    log = audit.AuditLog(tmp_path / 'a.jsonl')
    log.append(record)
    assert log.last_record()['update_norm'] == 0.5
    assert audit.verify_chain(log.path).ok

  def test_append_refuses_round_out_of_sequence(self, log_path):
    log = audit.AuditLog(log_path)
    for wrong in (5, 7):
      with pytest.raises(audit.AuditError, match='round must be 6'):
        log.append(_record(wrong))
    log.append(_record(6))
    assert audit.verify_chain(log_path).records == 6


class TestTampering:
  """Each tampering is reported at the first line where it shows (1-based)."""

  def test_changed_field(self, log_path):
    lines = _lines(log_path)
    record = json.loads(lines[2])
    record['update_norm'] = 99.0
    lines[2] = json.dumps(record, sort_keys=True, separators=(',', ':')) + '\n'
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line, result.records) == (False, 3, 2)
    assert 'record_hash does not match' in result.reason

  def test_changed_field_with_forged_hash_breaks_next_line(self, log_path):
    lines = _lines(log_path)
    record = json.loads(lines[2])
    record['participants'] = ['client_99999', 'client_00103']
    lines[2] = _rehash(record)
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert 'prev_hash does not match' in result.reason

  def test_bad_hash_value(self, log_path):
    lines = _lines(log_path)
    record = json.loads(lines[1])
    record['record_hash'] = 'f' * 64
    lines[1] = json.dumps(record, sort_keys=True, separators=(',', ':')) + '\n'
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    assert 'record_hash does not match' in result.reason

  def test_deleted_middle_record(self, log_path):
    lines = _lines(log_path)
    del lines[2]
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 3)
    assert 'prev_hash does not match' in result.reason

  def test_deleted_first_record(self, log_path):
    _write_lines(log_path, _lines(log_path)[1:])
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line, result.records) == (False, 1, 0)
    assert 'genesis' in result.reason

  def test_reordered_records(self, log_path):
    lines = _lines(log_path)
    lines[1], lines[2] = lines[2], lines[1]
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    assert 'prev_hash does not match' in result.reason

  def test_non_json_line(self, log_path):
    lines = _lines(log_path)
    lines.insert(3, 'not json at all\n')
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert result.reason == 'not a JSON record'

  def test_round_gap_in_an_otherwise_valid_chain(self, tmp_path):
    # A forger recomputing every hash still cannot skip a round.
    path = tmp_path / 'forged.jsonl'
    prev = audit.GENESIS_HASH
    lines = []
    for r in (1, 2, 4):
      record = dict(_record(r), prev_hash=prev)
      line = _rehash(record)
      prev = json.loads(line)['record_hash']
      lines.append(line)
    _write_lines(path, lines)
    result = audit.verify_chain(path)
    assert (result.ok, result.first_bad_line) == (False, 3)
    assert result.reason == 'round must be 3. Found 4.'

  def test_field_outside_allow_list_in_file(self, log_path):
    lines = _lines(log_path)
    record = json.loads(lines[0])
    record['note'] = 'anything'
    lines[0] = _rehash(record)
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 1)
    assert "'note'" in result.reason

  def test_records_cut_from_the_end_caught_by_expected_count(self, log_path):
    _write_lines(log_path, _lines(log_path)[:3])
    assert audit.verify_chain(log_path).ok  # A hash chain alone cannot tell.
    result = audit.verify_chain(log_path, expected_records=5)
    assert (result.ok, result.first_bad_line, result.records) == (False, 4, 3)

  def test_append_refuses_to_chain_onto_a_damaged_record(self, log_path):
    lines = _lines(log_path)
    lines[-1] = lines[-1].replace('"round":5', '"round":50')
    _write_lines(log_path, lines)
    with pytest.raises(audit.AuditError, match='last record must be intact'):
      audit.AuditLog(log_path).append(_record(6))


class TestPartialTail:

  def test_partial_tail_is_repaired(self, log_path):
    with open(log_path, 'rb') as f:
      complete = f.read()
    full_sixth = json.dumps(_record(6)).encode()
    with open(log_path, 'ab') as f:
      f.write(full_sixth[:40])  # A writer killed mid-line.
    log = audit.AuditLog(log_path)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 6)
    assert 'incomplete last line' in result.reason
    with pytest.raises(audit.AuditError, match='partial last line'):
      log.append(_record(6))

    assert log.repair_partial_tail()
    with open(log_path, 'rb') as f:
      assert f.read() == complete
    assert audit.verify_chain(log_path).ok
    log.append(_record(6))
    assert audit.verify_chain(log_path).records == 6

  def test_complete_last_line_is_never_touched(self, log_path):
    with open(log_path, 'ab') as f:
      f.write(b'garbage but complete\n')
    with open(log_path, 'rb') as f:
      before = f.read()
    assert not audit.AuditLog(log_path).repair_partial_tail()
    with open(log_path, 'rb') as f:
      assert f.read() == before

  def test_partial_only_line_is_truncated_to_empty(self, tmp_path):
    path = tmp_path / 'a.jsonl'
    path.write_bytes(b'{"round": 1, "ti')
    assert audit.AuditLog(path).repair_partial_tail()
    assert path.read_bytes() == b''
    assert not audit.AuditLog(tmp_path / 'absent.jsonl').repair_partial_tail()


class TestNoIdentifiers:

  @pytest.mark.parametrize('field, value', [
      ('patient_id', '12345'),
      ('PatientName', 'Doe^John'),
      ('note', 'scan of John Doe'),
      ('hospital', 'St. Elsewhere'),
  ])
  def test_unknown_field_refused(self, tmp_path, field, value):
    log = audit.AuditLog(tmp_path / 'a.jsonl')
    with pytest.raises(ValueError, match='record fields must be among'):
      log.append(dict(_record(1), **{field: value}))
    assert not os.path.exists(log.path)

  @pytest.mark.parametrize('participants', [
      ['John Doe'], ['client_00001', 'MRN-443211'], ['client_x'], 'client_00001',
  ])
  def test_non_pseudonymous_participants_refused_without_echoing_them(self, tmp_path,
                                                                      participants):
    with pytest.raises(audit.AuditError, match='pseudonymous client ids') as raised:
      audit.AuditLog(tmp_path / 'a.jsonl').append(
          dict(_record(1), participants=participants, num_participants=len(participants)))
    assert 'John' not in str(raised.value) and 'MRN' not in str(raised.value)

  @pytest.mark.parametrize('field, value, message', [
      ('categories_released', ['HeadCT', 'Doe^John'], 'categories_released must be a list of '
       'category ids'),
      ('clip_norms', {'John Doe': 0.1}, 'clip_norms must be an object keyed by category ids'),
      ('epsilon_spent', {'HeadCT': float('nan')}, 'epsilon_spent.HeadCT must be a finite'),
      ('update_norm', None, 'update_norm must be a finite non-negative number'),
      ('update_norm', True, 'update_norm must be a finite non-negative number'),
      ('model_sha256', 'abc', 'model_sha256 must be 64 lowercase hex digits'),
      ('time', '2024-05-01T12:00:00', 'time must be a UTC ISO-8601 string'),
      ('time', '2024-05-01T12:00:00+02:00', 'time must be a UTC ISO-8601 string'),
      ('round', -1, 'round must be a non-negative integer'),
      ('num_participants', 3, 'num_participants must equal the number of participants'),
      ('prev_hash', '0' * 64, 'must not set prev_hash or record_hash'),
  ])
  def test_bad_values_refused(self, tmp_path, field, value, message):
    with pytest.raises(audit.AuditError, match=message):
      audit.AuditLog(tmp_path / 'a.jsonl').append(dict(_record(1), **{field: value}))

  def test_round_is_required(self, tmp_path):
    record = _record(1)
    del record['round']
    with pytest.raises(audit.AuditError, match='round'):
      audit.AuditLog(tmp_path / 'a.jsonl').append(record)


class TestWeightsHash:

  def test_stable(self):
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(3, 3, 1, 4)).astype(np.float32), np.zeros((4,), np.float32)]
    copy = [w.copy() for w in weights]
    assert audit.model_weights_sha256(weights) == audit.model_weights_sha256(copy)
    # Memory layout is not content: a Fortran-ordered copy hashes the same.
    assert audit.model_weights_sha256([np.asfortranarray(weights[0]), weights[1]]) == (
        audit.model_weights_sha256(weights))
    assert len(audit.model_weights_sha256(weights)) == 64

  def test_sensitive(self):
    weights = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((4,), np.float32)]
    reference = audit.model_weights_sha256(weights)
    changed = [weights[0].copy(), weights[1]]
    changed[0][1, 2] = np.nextafter(changed[0][1, 2], np.float32(100))  # One ulp.
    variants = {
        'one value by one ulp': changed,
        'shape': [weights[0].reshape(4, 3), weights[1]],
        'dtype, same bytes': [weights[0].view(np.int32), weights[1]],
        'order': [weights[1], weights[0]],
        'split differently': [np.concatenate([weights[0].ravel(), weights[1]])],
        'one array fewer': [weights[0]],
    }
    for name, variant in variants.items():
      assert audit.model_weights_sha256(variant) != reference, name


class TestScript:

  def _run(self, run_dir):
    return subprocess.run([sys.executable, _SCRIPT, f'--run_dir={run_dir}'],
                          capture_output=True, text=True, timeout=60, check=False)

  def test_ok_and_broken(self, log_path):
    run_dir = os.path.dirname(log_path)
    done = self._run(run_dir)
    assert (done.returncode, done.stdout.strip()) == (0, 'audit chain OK: 5 records')

    lines = _lines(log_path)
    del lines[1]
    _write_lines(log_path, lines)
    done = self._run(run_dir)
    assert done.returncode == 1
    assert done.stdout.startswith('audit chain BROKEN at line 2: prev_hash does not match')

  def test_ledger_rounds_must_match_record_count(self, log_path):
    run_dir = os.path.dirname(log_path)
    with open(os.path.join(run_dir, 'privacy_ledger.json'), 'w') as f:
      json.dump({'rounds_completed': 7}, f)
    done = self._run(run_dir)
    assert done.returncode == 1
    assert done.stdout.startswith('audit chain BROKEN at line 6: expected 7 records. Found 5')

  def test_missing_log_is_one_clear_line(self, tmp_path):
    done = self._run(tmp_path)
    assert done.returncode == 1
    assert 'Traceback' not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f'error: audit log must be a file. Found none at {tmp_path / "audit_log.jsonl"}.']
