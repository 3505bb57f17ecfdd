"""The audit log: a keyed chain verifies; every kind of tampering (a record edited with every
plain hash recomputed, deleted, reordered, records cut from the end, a ledger edited) is
reported at its line; a foreign key is reported as such; old unkeyed logs are read and called
unkeyed; the custodian key is owner-only from the moment it exists; identifiers cannot enter a
record; the weights hash is exact.

Every test runs under the session's TFF_MEDICAL_AUDIT_KEY_FILE (tests/conftest.py), or under a
key of its own in tmp_path: none touches the real home directory.
"""

import hashlib
import hmac
import json
import os
import shutil
import stat
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


def _canonical(record: dict) -> str:
  return json.dumps(record, sort_keys=True, separators=(',', ':'))


@pytest.fixture
def log_path(tmp_path):
  """A valid keyed log of rounds 1..5 in tmp_path (the run folder), anchored beside the key."""
  log = audit.AuditLog(tmp_path / audit.AUDIT_LOG_FILENAME)
  for r in range(1, 6):
    log.append(_record(r))
  return log.path


@pytest.fixture
def other_key(tmp_path):
  """Another custodian's key file."""
  path = str(tmp_path / 'other_custodian' / 'audit.key')
  audit.load_key(path, create=True)
  return path


def _lines(path) -> list[str]:
  with open(path) as f:
    return f.read().splitlines(keepends=True)


def _write_lines(path, lines) -> None:
  with open(path, 'w') as f:
    f.writelines(lines)


def _relink(lines, start, edit=lambda record: None, secret=None):
  """Edits the record at `start`, then re-links it and every later record and recomputes each
  "mac": as plain SHA-256 (what a forger without the key can do) or, given a secret, as HMAC."""
  records = [json.loads(line) for line in lines]
  edit(records[start])
  prev = records[start - 1]['mac'] if start else audit.GENESIS_MAC
  out = list(lines[:start])
  for record in records[start:]:
    record['prev_mac'] = prev
    if secret is None:
      body = {k: v for k, v in record.items() if k != 'mac'}
      record['mac'] = hashlib.sha256(_canonical(body).encode()).hexdigest()
    else:
      record['mac'] = audit.record_mac(record, secret)
    prev = record['mac']
    out.append(_canonical(record) + '\n')
  return out


def _legacy_lines(rounds) -> list[str]:
  """A log as written before records were keyed: plain SHA-256 chain (prev_hash/record_hash)."""
  prev, lines = audit.GENESIS_HASH, []
  for r in rounds:
    record = dict(_record(r), prev_hash=prev)
    record['record_hash'] = prev = audit.record_hash(record)
    lines.append(_canonical(record) + '\n')
  return lines


def _ledger(path_dir, record_round: int, **edits) -> None:
  """A privacy_ledger.json that agrees with _record(record_round), then `edits` applied."""
  record = _record(record_round)
  ledger = {'rounds_completed': record_round, 'client_level_epsilon':
            record['client_level_epsilon'], 'categories': {
                c: {'epsilon_spent': e} for c, e in record['epsilon_spent'].items()}}
  ledger.update(edits)
  with open(os.path.join(path_dir, 'privacy_ledger.json'), 'w') as f:
    json.dump(ledger, f)


def _bad(result):
  return (result.ok, result.status, result.first_bad_line, result.bad_round)


class TestKey:

  def test_key_is_owner_only_from_the_moment_it_exists(self, tmp_path, monkeypatch):
    """Observed at creation (not only at the end), with a umask that would allow anything."""
    key_file = tmp_path / 'custodian' / 'audit.key'
    created = []
    real_open, real_mkdir = os.open, os.mkdir

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
      fd = real_open(path, flags, mode, *args, **kwargs)
      if flags & os.O_CREAT:
        created.append((os.fspath(path), 'file', stat.S_IMODE(os.fstat(fd).st_mode)))
      return fd

    def spy_mkdir(path, mode=0o777, *args, **kwargs):
      real_mkdir(path, mode, *args, **kwargs)
      created.append((os.fspath(path), 'dir', stat.S_IMODE(os.lstat(path).st_mode)))

    monkeypatch.setattr(os, 'open', spy_open)
    monkeypatch.setattr(os, 'mkdir', spy_mkdir)
    old_umask = os.umask(0)
    try:
      audit.AuditLog(tmp_path / 'audit_log.jsonl', key_file=key_file).append(_record(1))
    finally:
      os.umask(old_umask)
      monkeypatch.undo()

    custodian = [c for c in created if c[0].startswith(str(key_file.parent))]
    kinds = {(os.path.basename(p) if kind == 'dir' else kind) for p, kind, _ in custodian}
    # The key folder, the anchors' folder, the key's and the anchor's temporary files.
    assert kinds == {'custodian', 'heads', 'file'}, custodian
    assert len([c for c in custodian if c[1] == 'file']) >= 2, custodian
    for path, kind, mode in custodian:
      assert mode == (0o700 if kind == 'dir' else 0o600), (path, oct(mode))
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert key_file.read_bytes() != b'\0' * audit.KEY_BYTES
    assert len(key_file.read_bytes()) == audit.KEY_BYTES
    [anchor] = os.listdir(key_file.parent / 'heads')
    assert stat.S_IMODE(os.stat(key_file.parent / 'heads' / anchor).st_mode) == 0o600
    # Nothing left behind but the key and the anchors.
    assert sorted(os.listdir(key_file.parent)) == ['audit.key', 'heads']

  def test_key_file_location_default_env_and_argument(self, tmp_path, monkeypatch):
    monkeypatch.delenv(audit.KEY_FILE_ENV)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    default = tmp_path / 'home' / '.config' / 'tff_medical' / 'audit.key'
    assert audit.default_key_file() == str(default)
    made = audit.AuditLog(tmp_path / 'a.jsonl').key()
    assert made.path == str(default) and default.exists()
    assert stat.S_IMODE(os.stat(default.parent).st_mode) == 0o700

    monkeypatch.setenv(audit.KEY_FILE_ENV, str(tmp_path / 'env' / 'k'))
    assert audit.AuditLog(tmp_path / 'b.jsonl').key().path == str(tmp_path / 'env' / 'k')
    explicit = audit.AuditLog(tmp_path / 'c.jsonl', key_file=tmp_path / 'arg' / 'k').key()
    assert explicit.path == str(tmp_path / 'arg' / 'k')
    assert len({made.key_id, explicit.key_id,
                audit.load_key(tmp_path / 'env' / 'k').key_id}) == 3

  def test_key_id_is_a_hash_prefix_not_the_key(self, log_path):
    key = audit.load_key()
    assert key.key_id == hashlib.sha256(key.secret).hexdigest()[:16]
    assert key.secret.hex() not in repr(key)
    with open(log_path, 'rb') as f:
      assert key.secret.hex().encode() not in f.read()

  def test_missing_key_on_verification_is_a_clear_error_and_creates_none(self, log_path,
                                                                          tmp_path):
    absent = tmp_path / 'nowhere' / 'audit.key'
    with pytest.raises(audit.AuditKeyError, match='audit key must be a file. Found none at'):
      audit.verify_chain(log_path, key_file=absent)
    assert not absent.exists() and not absent.parent.exists()

  @pytest.mark.parametrize('content, mode, message', [
      (b'k' * 32, 0o644, 'readable by this user only'),
      (b'k' * 32, 0o640, 'readable by this user only'),
      (b'k' * 16, 0o600, 'must hold 32 bytes. Found 16'),
      (b'k' * 33, 0o600, 'must hold 32 bytes. Found 33 or more'),
  ])
  def test_unsafe_or_malformed_key_refused(self, tmp_path, content, mode, message):
    folder = tmp_path / 'custodian'
    folder.mkdir(mode=0o700)
    key_file = folder / 'audit.key'
    key_file.write_bytes(content)
    os.chmod(key_file, mode)
    with pytest.raises(audit.AuditKeyError, match=message):
      audit.load_key(key_file)

  def test_key_folder_others_can_write_is_refused(self, tmp_path):
    folder = tmp_path / 'shared'
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(audit.AuditKeyError, match='writable by this user only'):
      audit.load_key(folder / 'audit.key', create=True)
    assert not (folder / 'audit.key').exists()

  def test_key_symlink_refused(self, tmp_path):
    folder = tmp_path / 'custodian'
    folder.mkdir(mode=0o700)
    real = folder / 'real.key'
    real.write_bytes(b'k' * 32)
    os.chmod(real, 0o600)
    (folder / 'audit.key').symlink_to(real)
    with pytest.raises(audit.AuditKeyError, match='regular file'):
      audit.load_key(folder / 'audit.key')


class TestChain:

  def test_valid_chain_verifies_against_its_anchor(self, log_path):
    result = audit.verify_chain(log_path)
    assert (result.ok, result.status, result.records) == (True, audit.Status.OK, 5)
    assert result.head == audit.AuditLog(log_path).head()
    assert result.head['round'] == 5 and result.notes == ()
    assert result.checked == ('the anchor (round 5)',)
    assert result.describe().startswith('5 keyed records intact (key id ')
    # It names every round's participants: owner-only, like the other confidential files.
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600

  def test_records_are_keyed_and_chained(self, log_path):
    secret = audit.load_key().secret
    records = audit.AuditLog(log_path).records()
    assert [r['round'] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]['prev_mac'] == '0' * 64
    for prev, record in zip(records, records[1:]):
      assert record['prev_mac'] == prev['mac']
    for record in records:
      assert record['audit_version'] == 2
      assert record['key_id'] == hashlib.sha256(secret).hexdigest()[:16]
      body = {k: v for k, v in record.items() if k != 'mac'}
      expected = hmac.new(secret, _canonical(body).encode(), hashlib.sha256).hexdigest()
      assert record['mac'] == expected
      # The plain hash of the same bytes is not the MAC: recomputing it forges nothing.
      assert record['mac'] != hashlib.sha256(_canonical(body).encode()).hexdigest()

  def test_head_of_empty_and_written_log(self, tmp_path):
    log = audit.AuditLog(tmp_path / 'a.jsonl')
    empty = log.head()
    assert (empty['round'], empty['mac']) == (0, '0' * 64)
    written = log.append(_record(1))
    assert log.head() == {'audit_version': 2, 'round': 1, 'mac': written['mac'],
                          'key_id': written['key_id']}
    assert log.verify_against(empty).ok and log.verify_against(log.head()).ok

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
  """Each tampering is reported at the first line where it shows (1-based), with its round."""

  def test_edited_record_with_every_hash_recomputed(self, log_path):
    # The attack: change a middle record's participants and epsilon, recompute every
    # hash after it. Without the key the forger can only produce plain hashes.
    def edit(record):
      record['participants'] = ['client_99999', 'client_00103']
      record['epsilon_spent']['HeadCT'] = 0.001
    _write_lines(log_path, _relink(_lines(log_path), 2, edit))
    result = audit.verify_chain(log_path)
    assert _bad(result) == (False, audit.Status.BROKEN, 3, 3)
    assert result.records == 2
    assert result.reason.startswith('mac does not match the record')
    assert result.describe().startswith('broken at line 3 (round 3): mac does not match')

  def test_edited_record_keyed_with_another_key(self, log_path, other_key):
    _write_lines(log_path, _relink(_lines(log_path), 2, lambda r: r.update(update_norm=9.0),
                                   audit.load_key(other_key).secret))
    assert _bad(audit.verify_chain(log_path)) == (False, audit.Status.BROKEN, 3, 3)

  def test_changed_field_without_new_mac(self, log_path):
    lines = _lines(log_path)
    record = json.loads(lines[2])
    record['update_norm'] = 99.0
    lines[2] = _canonical(record) + '\n'
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert _bad(result) == (False, audit.Status.BROKEN, 3, 3)
    assert 'mac does not match' in result.reason

  def test_repeated_field_is_not_canonical(self, log_path):
    # Python keeps the last of two equal keys, other readers the first: a line must be exactly
    # what append() wrote.
    lines = _lines(log_path)
    lines[1] = lines[1].replace('{', '{"update_norm":5.0,', 1)
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert _bad(result) == (False, audit.Status.BROKEN, 2, 2)
    assert 'canonical form' in result.reason

  def test_deleted_middle_record(self, log_path):
    lines = _lines(log_path)
    del lines[2]
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert _bad(result) == (False, audit.Status.BROKEN, 3, 4)
    assert 'prev_mac does not match' in result.reason

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
    assert _bad(result) == (False, audit.Status.BROKEN, 2, 3)
    assert 'prev_mac does not match' in result.reason

  def test_non_json_line(self, log_path):
    lines = _lines(log_path)
    lines.insert(3, 'not json at all\n')
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert result.reason == 'not a JSON record'

  def test_round_gap_even_with_the_key(self, tmp_path):
    # Someone holding the key still cannot skip a round unnoticed.
    secret = audit.load_key().secret
    key_id = audit.load_key().key_id
    path, prev, lines = tmp_path / 'forged.jsonl', audit.GENESIS_MAC, []
    for r in (1, 2, 4):
      record = dict(_record(r), audit_version=2, key_id=key_id, prev_mac=prev)
      record['mac'] = prev = audit.record_mac(record, secret)
      lines.append(_canonical(record) + '\n')
    _write_lines(path, lines)
    result = audit.verify_chain(path)
    assert _bad(result) == (False, audit.Status.BROKEN, 3, 4)
    assert result.reason == 'round must be 3. Found 4.'

  def test_field_outside_allow_list_even_with_the_key(self, log_path):
    lines = _relink(_lines(log_path), 0, lambda r: r.update(note='anything'),
                    audit.load_key().secret)
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 1)
    assert "'note'" in result.reason

  def test_wrong_key_is_reported_as_such(self, log_path, other_key):
    result = audit.verify_chain(log_path, key_file=other_key)
    assert _bad(result) == (False, audit.Status.WRONG_KEY, 1, 1)
    assert result.describe().startswith('wrong key: the log was keyed with key id ')
    assert audit.load_key(other_key).key_id in result.reason
    assert audit.load_key().key_id in result.reason

  def test_whole_log_rekeyed_by_someone_else_is_a_wrong_key(self, log_path, other_key):
    other = audit.load_key(other_key)
    lines = [_canonical(dict(json.loads(line), key_id=other.key_id)) + '\n'
             for line in _lines(log_path)]
    _write_lines(log_path, _relink(lines, 0, secret=other.secret))
    assert audit.verify_chain(log_path, key_file=other_key, use_anchor=False).ok
    assert _bad(audit.verify_chain(log_path)) == (False, audit.Status.WRONG_KEY, 1, 1)

  def test_record_with_another_key_id_after_good_ones(self, log_path):
    lines = _lines(log_path)
    lines[3] = _canonical(dict(json.loads(lines[3]), key_id='f' * 16)) + '\n'
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert _bad(result) == (False, audit.Status.BROKEN, 4, 4)
    assert 'differs from the records before it' in result.reason


class TestTail:
  """Records cut from the end: caught by the anchor beside the key, an expected head, the
  ledger, or a record count; and not re-written over by a rerun."""

  def test_caught_by_the_anchor_without_a_ledger(self, log_path):
    _write_lines(log_path, _lines(log_path)[:3])
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line, result.records) == (False, 4, 3)
    assert result.reason == ('records removed from the end: the log ends at round 3, but the '
                             "custodian's anchored head is round 5")

  def test_emptied_log_is_caught_by_the_anchor(self, log_path):
    _write_lines(log_path, [])
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line, result.records) == (False, 1, 0)
    assert 'ends at no record' in result.reason

  def test_caught_by_an_expected_head_without_anchor_or_ledger(self, log_path):
    head = audit.AuditLog(log_path).head()
    _write_lines(log_path, _lines(log_path)[:4])
    result = audit.verify_chain(log_path, expected_head=head, use_anchor=False)
    assert (result.ok, result.first_bad_line) == (False, 5)
    assert 'but the expected head is round 5' in result.reason
    with pytest.raises(audit.AuditVerificationError, match='broken at line 5') as raised:
      audit.AuditLog(log_path).verify_against(head)
    assert raised.value.result.first_bad_line == 5

  def test_caught_by_a_record_count(self, log_path):
    _write_lines(log_path, _lines(log_path)[:3])
    result = audit.verify_chain(log_path, expected_records=5, use_anchor=False)
    assert (result.ok, result.first_bad_line, result.records) == (False, 4, 3)

  def test_a_moved_log_without_anchor_says_what_it_cannot_check(self, log_path, tmp_path):
    moved = tmp_path / 'moved'
    moved.mkdir()
    shutil.copy(log_path, moved / audit.AUDIT_LOG_FILENAME)
    _write_lines(moved / audit.AUDIT_LOG_FILENAME, _lines(log_path)[:3])
    result = audit.verify_chain(moved / audit.AUDIT_LOG_FILENAME)
    assert result.ok and result.records == 3
    assert result.notes and 'no anchor for this log' in result.notes[0]
    # With the ledger beside it, the cut is caught all the same.
    _ledger(str(moved), 5)
    tail = audit.verify_run_dir(moved)
    assert (tail.ok, tail.first_bad_line) == (False, 4)

  def test_a_replaced_log_does_not_match_the_anchor(self, log_path, tmp_path):
    other = audit.AuditLog(tmp_path / 'elsewhere.jsonl')
    for r in range(1, 6):
      other.append(dict(_record(r), update_norm=0.5))
    shutil.copy(other.path, log_path)
    result = audit.verify_chain(log_path)
    assert (result.ok, result.first_bad_line) == (False, 1)
    assert 'replaced' in result.reason

  def test_rerun_after_a_cut_refuses_to_append(self, log_path):
    # A resumed training run would append round 4 after rounds 4-5 were cut: refused.
    _write_lines(log_path, _lines(log_path)[:3])
    with pytest.raises(audit.AuditError, match='anchored up to round 5'):
      audit.AuditLog(log_path).append(_record(4))
    assert len(_lines(log_path)) == 3

  def test_append_refuses_to_chain_onto_a_damaged_record(self, log_path):
    lines = _lines(log_path)
    lines[-1] = lines[-1].replace('"round":5', '"round":50')
    _write_lines(log_path, lines)
    with pytest.raises(audit.AuditError, match='last record must be intact'):
      audit.AuditLog(log_path).append(_record(6))

  def test_append_refuses_another_key(self, log_path, other_key):
    with pytest.raises(audit.AuditError, match='must be keyed with this key'):
      audit.AuditLog(log_path, key_file=other_key).append(_record(6))

  def test_a_kill_before_the_anchor_moved_is_not_tampering(self, log_path):
    # append() makes the record durable, then moves the anchor: a kill in between leaves the
    # anchor a round behind the log. Simulated by putting round 4's head back in the anchor.
    anchor_file = audit.anchor_path(audit.load_key(), log_path)
    with open(anchor_file) as f:
      anchor = json.load(f)
    anchor.update(round=4, mac=json.loads(_lines(log_path)[3])['mac'])
    with open(anchor_file, 'w') as f:
      json.dump(anchor, f)
    result = audit.verify_chain(log_path)
    assert result.ok and result.checked == ('the anchor (round 4)',)
    audit.AuditLog(log_path).append(_record(6))
    assert audit.verify_chain(log_path).checked == ('the anchor (round 6)',)


class TestLedger:

  def test_ledger_agreeing_with_the_last_record(self, log_path):
    _ledger(os.path.dirname(log_path), 5)
    result = audit.verify_run_dir(os.path.dirname(log_path))
    assert result.ok, result
    assert 'the privacy ledger (5 rounds, epsilon)' in result.checked

  def test_ledger_rounds_must_match_record_count(self, log_path):
    _ledger(os.path.dirname(log_path), 5, rounds_completed=7)
    result = audit.verify_run_dir(os.path.dirname(log_path))
    assert (result.ok, result.first_bad_line) == (False, 6)
    assert result.reason.startswith('expected 7 records (the privacy ledger')

  def test_lowered_ledger_epsilon_is_reported(self, log_path):
    _ledger(os.path.dirname(log_path), 5,
            categories={'HeadCT': {'epsilon_spent': 0.01}, 'CXR': {'epsilon_spent': 0.1}})
    result = audit.verify_run_dir(os.path.dirname(log_path))
    assert (result.ok, result.status, result.first_bad_line) == (
        False, audit.Status.BROKEN, None)
    assert result.reason.startswith('the privacy ledger says HeadCT epsilon_spent 0.01, the '
                                    'audit record of round 5 says 0.05')
    assert result.describe().startswith('broken: the privacy ledger says HeadCT')

  def test_lowered_client_level_epsilon_is_reported(self, log_path):
    _ledger(os.path.dirname(log_path), 5, client_level_epsilon=0.1)
    result = audit.verify_run_dir(os.path.dirname(log_path))
    assert not result.ok and 'client_level_epsilon 0.1' in result.reason

  def test_removed_ledger_is_reported_when_records_carry_epsilon(self, log_path):
    result = audit.verify_run_dir(os.path.dirname(log_path))
    assert not result.ok and 'there is no privacy ledger' in result.reason

  def test_ledger_a_round_ahead_matches_the_checkpoints_pending_record(self, log_path):
    run_dir = os.path.dirname(log_path)
    _ledger(run_dir, 6)  # Saved, then killed before the round 6 record was appended.
    assert not audit.verify_run_dir(run_dir).ok
    assert audit.verify_run_dir(run_dir, pending_record=_record(6)).ok
    lowered = dict(_record(6), epsilon_spent={'HeadCT': 0.06, 'CXR': 0.1})
    result = audit.verify_run_dir(run_dir, pending_record=lowered)
    assert not result.ok and "the checkpoint's record of round 6" in result.reason

  def test_require_intact_raises_with_the_result(self, log_path):
    run_dir = os.path.dirname(log_path)
    _ledger(run_dir, 5)
    assert audit.require_intact(run_dir).ok
    _write_lines(log_path, _relink(_lines(log_path), 1, lambda r: r.update(update_norm=1.0)))
    with pytest.raises(audit.AuditVerificationError, match=r'broken at line 2 \(round 2\)'):
      audit.require_intact(run_dir)


class TestUnkeyedLogs:

  def test_old_log_is_read_and_called_unkeyed(self, tmp_path):
    path = tmp_path / audit.AUDIT_LOG_FILENAME
    _write_lines(path, _legacy_lines(range(1, 6)))
    result = audit.verify_chain(path)
    assert (result.ok, result.status, result.records) == (False, audit.Status.UNKEYED, 5)
    assert result.describe().startswith('unkeyed (not tamper-evident): 5 records')
    assert [r['round'] for r in audit.AuditLog(path).records()] == [1, 2, 3, 4, 5]

  def test_old_log_is_read_without_any_key(self, tmp_path):
    path = tmp_path / audit.AUDIT_LOG_FILENAME
    _write_lines(path, _legacy_lines(range(1, 4)))
    result = audit.verify_chain(path, key_file=tmp_path / 'absent.key')
    assert (result.status, result.records) == (audit.Status.UNKEYED, 3)
    assert 'no usable key' in result.notes[0]

  def test_old_log_edit_is_still_found(self, tmp_path):
    path = tmp_path / audit.AUDIT_LOG_FILENAME
    lines = _legacy_lines(range(1, 4))
    lines[1] = lines[1].replace('"update_norm":0.0123', '"update_norm":0.5')
    _write_lines(path, lines)
    result = audit.verify_chain(path)
    assert _bad(result) == (False, audit.Status.BROKEN, 2, 2)
    assert 'record_hash does not match' in result.reason

  def test_old_log_with_a_wrong_ledger_count_is_broken(self, tmp_path):
    _write_lines(tmp_path / audit.AUDIT_LOG_FILENAME, _legacy_lines(range(1, 4)))
    _ledger(str(tmp_path), 3)
    assert audit.verify_run_dir(tmp_path).status is audit.Status.UNKEYED
    _ledger(str(tmp_path), 3, rounds_completed=4)
    assert audit.verify_run_dir(tmp_path).status is audit.Status.BROKEN

  def test_keyed_log_replaced_by_an_unkeyed_one(self, log_path):
    _write_lines(log_path, _legacy_lines(range(1, 6)))
    result = audit.verify_chain(log_path)
    assert (result.status, result.first_bad_line) == (audit.Status.BROKEN, 1)
    assert 'unkeyed, but a keyed chain up to round 5 was anchored' in result.reason

  def test_old_log_is_not_extended(self, tmp_path):
    path = tmp_path / audit.AUDIT_LOG_FILENAME
    _write_lines(path, _legacy_lines(range(1, 3)))
    with pytest.raises(audit.AuditError, match='must be keyed to be extended'):
      audit.AuditLog(path).append(_record(3))

  def test_mixed_log_is_broken(self, log_path):
    lines = _lines(log_path)[:2] + _legacy_lines([3])
    _write_lines(log_path, lines)
    result = audit.verify_chain(log_path)
    assert (result.first_bad_line, result.reason) == (3, 'an unkeyed record in a keyed log')


class TestPartialTail:

  def test_partial_tail_is_repaired(self, log_path):
    with open(log_path, 'rb') as f:
      complete = f.read()
    full_sixth = json.dumps(_record(6)).encode()
    with open(log_path, 'ab') as f:
      f.write(full_sixth[:40])  # A writer killed mid-line (before the anchor moved).
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
      ('prev_hash', '0' * 64, 'must not set chain fields'),
      ('mac', '0' * 64, 'must not set chain fields'),
      ('key_id', '0' * 16, 'must not set chain fields'),
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


@pytest.mark.slow  # End-to-end tier: the entry point in a fresh interpreter.
class TestScript:

  def _run(self, run_dir, *flags):
    return subprocess.run([sys.executable, _SCRIPT, f'--run_dir={run_dir}', *flags],
                          capture_output=True, text=True, timeout=60, check=False)

  def test_ok_then_an_edited_record_with_recomputed_hashes(self, log_path):
    run_dir = os.path.dirname(log_path)
    _ledger(run_dir, 5)
    done = self._run(run_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('audit log OK: 5 keyed records intact (key id ')
    assert 'the anchor (round 5)' in done.stdout and 'privacy ledger' in done.stdout

    _write_lines(log_path, _relink(_lines(log_path), 1,
                                   lambda r: r.update(participants=['client_00001'],
                                                      num_participants=1)))
    done = self._run(run_dir)
    assert done.returncode == 1
    assert done.stdout.startswith('audit log broken at line 2 (round 2): mac does not match')

  def test_cut_tail_wrong_key_and_unkeyed_log(self, log_path, other_key, tmp_path):
    run_dir = os.path.dirname(log_path)
    head = json.dumps(audit.AuditLog(log_path).head())
    done = self._run(run_dir, f'--key_file={other_key}')
    assert done.returncode == 1 and done.stdout.startswith('audit log wrong key: ')

    _write_lines(log_path, _lines(log_path)[:4])
    done = self._run(run_dir, f'--expected_head={head}')
    assert done.returncode == 1
    assert done.stdout.startswith('audit log broken at line 5: records removed from the end')

    old = tmp_path / 'old_run'
    old.mkdir()
    _write_lines(old / audit.AUDIT_LOG_FILENAME, _legacy_lines(range(1, 3)))
    _ledger(str(old), 2)
    done = self._run(old)
    assert done.returncode == 1
    assert done.stdout.startswith('audit log unkeyed (not tamper-evident): 2 records')

  def test_bad_input_is_one_clear_line(self, tmp_path, log_path):
    done = self._run(tmp_path / 'empty')
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f'error: run_dir must be a folder. Found none at {tmp_path / "empty"}.']
    run_dir = os.path.dirname(log_path)
    absent = tmp_path / 'absent.key'
    done = self._run(run_dir, f'--key_file={absent}')
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert done.stderr.startswith(f'error: audit key must be a file. Found none at {absent}.')
    done = self._run(run_dir, '--expected_head=not json')
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert '--expected_head must be JSON like' in done.stderr
