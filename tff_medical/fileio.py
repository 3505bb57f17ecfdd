"""Atomic file writes: a reader (the dashboard, an auditor, a resumed run) sees the old file or
the new one, never half of one, and a failed write leaves no temporary file behind."""

import os
import tempfile
from typing import Union

_FILE_MODE = 0o644  # mkstemp creates 0600; run outputs are for whoever may read the run.


def write_atomic(path: Union[str, 'os.PathLike[str]'], data: Union[str, bytes],
                 mode: int = _FILE_MODE) -> str:
  """Writes `data` to `path` through a synced temporary file and os.replace; returns the path.

  `mode`: the file's permissions (0o600 for a secret).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.',
                                  suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp_path, mode)
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.unlink(tmp_path)
    raise
  try:  # Makes the rename itself durable; some file systems cannot open directories.
    dir_fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return path
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)
  return path
