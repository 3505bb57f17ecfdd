"""The compliance identifier scan keeps up with a live run directory without rereading it."""

import builtins
import os

from tff_medical.monitoring import compliance


def _kinds(run_dir):
  return sorted(f.kind for f in compliance.scan_for_identifiers(str(run_dir)))


def test_a_file_changed_in_place_is_scanned_again(tmp_path):
  log = tmp_path / 'audit_log.jsonl'
  log.write_text('{"round": 1}\n')
  assert _kinds(tmp_path) == []
  with open(log, 'a') as f:  # Same inode: only the size and modification time change.
    f.write('{"PatientName": "Doe^Jane"}\n')
  assert 'a DICOM patient attribute keyword (PatientName, PatientID, ...)' in _kinds(tmp_path)
  replaced = tmp_path / 'metrics.csv'
  replaced.write_text('round,loss\n1,0.5\n')
  assert len(_kinds(tmp_path)) == 2
  tmp = tmp_path / 'metrics.tmp'  # An atomic rewrite: a new inode.
  tmp.write_text('round,uid\n1,1.2.840.10008.1\n')
  os.replace(tmp, replaced)
  assert 'a DICOM-like UID (1.2.840.*)' in _kinds(tmp_path)


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
  (tmp_path / 'ledger.json').write_text('{"Family^Given": 1}\n')
  first = _kinds(tmp_path)
  assert first == ['a DICOM person-name value (Family^Given)']
  opened = []
  real_open = builtins.open
  monkeypatch.setattr(builtins, 'open', lambda path, *a, **k: (opened.append(path),
                                                               real_open(path, *a, **k))[1])
  assert _kinds(tmp_path) == first  # The finding stays, from the cache.
  assert opened == []
  (tmp_path / 'new.txt').write_text('clean\n')
  assert _kinds(tmp_path) == first
  assert opened == [os.path.join(str(tmp_path), 'new.txt')]
