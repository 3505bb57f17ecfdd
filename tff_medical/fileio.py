"""Atomic file writes: a reader (the dashboard, an auditor, a resumed run) sees the old file or
the new one, never half of one, and a failed write leaves no temporary file behind."""

import contextlib
import os
import tempfile
from typing import Iterator, Optional, Union


def _current_umask() -> int:
  mask = os.umask(0o077)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def owner_only() -> Iterator[None]:
  """Everything created inside is owner-only (umask 077): no file is readable for a moment.

  A run directory holds confidential files (participants, the sampler's secret); what may be
  published leaves it through the release command, never by its modes.
  """
  previous = os.umask(0o077)
  try:
    yield
  finally:
    os.umask(previous)


def write_atomic(path: Union[str, 'os.PathLike[str]'], data: Union[str, bytes],
                 mode: Optional[int] = None) -> str:
  """Writes `data` to `path` through a synced temporary file and os.replace; returns the path.

  `mode`: the file's permissions (0o600 for a secret); default: what the umask allows (0644
  normally, 0600 inside `owner_only`).
  """
  if mode is None:
    mode = 0o666 & ~_current_umask()
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
  fsync_dir(directory)
  return path


def fsync_dir(directory: str) -> None:
  """Makes a rename into `directory` durable; some file systems cannot open directories."""
  try:
    dir_fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)
