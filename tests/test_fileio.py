"""Atomic writes: the old file or the new one, never half, and no temporary file left."""

import os

import pytest

from tff_medical import fileio


def test_write_replaces_whole_file(tmp_path):
  path = tmp_path / 'out' / 'a.json'
  assert fileio.write_atomic(path, '{"a": 1}') == str(path)
  fileio.write_atomic(path, b'{"a": 2}')
  assert path.read_text() == '{"a": 2}'
  assert os.listdir(path.parent) == ['a.json']
  assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / 'a.json'
  fileio.write_atomic(path, 'old')

  def broken_fsync(fd):
    raise OSError('disk full')

  monkeypatch.setattr(fileio.os, 'fsync', broken_fsync)
  with pytest.raises(OSError, match='disk full'):
    fileio.write_atomic(path, 'new')
  monkeypatch.undo()
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['a.json']
