"""Bounds on input files, checked before anything is decoded, so that no file can hang a load or
exhaust memory. Each limit and its skip reason: docs/DESIGN.md.
"""

import dataclasses
import os
import stat
from typing import BinaryIO

from tff_medical.errors import DataError

MiB = 2**20
GiB = 2**30

REASON_NOT_REGULAR = 'not a regular file'
REASON_FILE_TOO_LARGE = 'file larger than max_file_bytes'
REASON_TOO_MANY_PIXELS = 'image larger than max_image_pixels'
REASON_PIXEL_DATA_TOO_LARGE = 'DICOM pixel data larger than max_dicom_pixel_bytes'
REASON_INFLATED_TOO_LARGE = 'deflated DICOM larger than max_inflated_bytes'
REASON_MEMBER_TOO_LARGE = 'archive member larger than max_member_bytes'
REASON_PIL_BOMB = "over PIL's decompression-bomb limit"
REASON_UNREADABLE_FILE = 'unreadable file'


@dataclasses.dataclass(frozen=True)
class InputLimits:
  """The bounds checked before decoding (each in docs/DESIGN.md); every field a positive integer."""

  max_file_bytes: int = 512 * MiB
  max_image_pixels: int = 8192 * 8192
  max_dicom_pixel_bytes: int = 2 * GiB
  max_inflated_bytes: int = 512 * MiB
  max_member_bytes: int = 64 * MiB  # MedNIST's members are about 2 KiB.
  # MedNIST.tar.gz is well under 1 GiB uncompressed; reading 2 GiB takes seconds, not minutes.
  max_archive_bytes: int = 2 * GiB
  max_archive_members: int = 1_000_000  # MedNIST.tar.gz holds 58,960.

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f'{field.name} must be a positive integer. Found {value!r}.')


DEFAULT_LIMITS = InputLimits()


class InputRefused(Exception):
  """One file is not read; `reason` is one of the fixed REASON_* strings.

  `detail` is the system's message for an unreadable file ('No such file or directory'), for a
  user who names the file; loaders report only `reason`.
  """

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(reason)
    self.reason = reason
    self.detail = detail


def check_limits(limits) -> InputLimits:
  if not isinstance(limits, InputLimits):
    raise DataError(f'limits must be an InputLimits. Found {limits!r}.')
  return limits


def _check_regular(st: os.stat_result, max_bytes: int) -> None:
  if not stat.S_ISREG(st.st_mode):
    raise InputRefused(REASON_NOT_REGULAR)
  if st.st_size > max_bytes:
    raise InputRefused(REASON_FILE_TOO_LARGE)


def open_regular_file(path: str, max_bytes: int) -> BinaryIO:
  """The regular file at `path`, opened for binary reading, if it holds at most `max_bytes`.

  The size is the one at opening; use `read_regular_file` to also refuse a file that grows.

  Raises:
    InputRefused: not a regular file, larger than `max_bytes`, or unreadable (any OSError:
      missing, permissions, a folder).
  """
  try:
    # Checked before opening: opening a FIFO blocks, opening some devices has side effects.
    _check_regular(os.stat(path), max_bytes)
    # O_NONBLOCK: a FIFO swapped in after the check opens without waiting for a writer (and is
    # then refused below); it changes nothing for regular files.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
  except OSError as e:
    raise InputRefused(REASON_UNREADABLE_FILE, e.strerror or '') from None
  f = open(fd, 'rb')  # pylint: disable=consider-using-with
  try:
    _check_regular(os.fstat(fd), max_bytes)
  except BaseException:
    f.close()
    raise
  return f


def read_regular_file(path: str, max_bytes: int) -> bytes:
  """The whole content of the regular file at `path`, at most `max_bytes`.

  Raises:
    InputRefused: as `open_regular_file`, or the file grew past `max_bytes` while read.
  """
  with open_regular_file(path, max_bytes) as f:
    try:
      # One byte more than allowed: a file that grew after the check is refused, not cut.
      data = f.read(max_bytes + 1)
    except OSError as e:
      raise InputRefused(REASON_UNREADABLE_FILE, e.strerror or '') from None
  if len(data) > max_bytes:
    raise InputRefused(REASON_FILE_TOO_LARGE)
  return data
