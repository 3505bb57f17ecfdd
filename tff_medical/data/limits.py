"""Bounds on input files, checked before anything is decoded, so that no file can hang a load or
exhaust memory.

What is checked, and the reason reported in the loader's skip report when a file is refused:
  * Only regular files are read (a symlink to one is fine). FIFOs, devices, sockets and links to
    them are skipped as 'not a regular file' without being opened for reading data: a FIFO would
    block forever and /dev/zero would never end. The check is made on the path, then again on
    the opened descriptor, so a file swapped in between is still refused.
  * `max_file_bytes`: a file larger than this is not read ('file larger than max_file_bytes').
  * `max_image_pixels`: one frame's Rows x Columns x SamplesPerPixel for DICOM, width x height
    for JPEG and PNG, read from the header before any pixel is decoded ('image larger than
    max_image_pixels'). Decoding to the 64x64 model image costs about 26 bytes a pixel at its
    peak, so the default (8192 x 8192, larger than any detector in clinical use) stays near 2 GB.
  * `max_dicom_pixel_bytes`: Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated/8,
    the pixel data a DICOM header declares ('DICOM pixel data larger than max_dicom_pixel_bytes').
  * `max_inflated_bytes`: a deflate-compressed DICOM (Deflated Explicit VR Little Endian) is
    inflated in bounded steps first; above this size it is skipped ('deflated DICOM larger than
    max_inflated_bytes'). pydicom itself would inflate the whole file in one call.
  * `max_member_bytes`: an archive member larger than this is not read ('archive member larger
    than max_member_bytes').
  * `max_archive_bytes` and `max_archive_members`: the uncompressed size and the number of
    members of a tar archive. Above either the archive is refused as a whole with a DataError,
    as a truncated one is, since keeping the part read would silently drop whole categories.
  * PIL's own decompression-bomb guard, if it fires, is reported as 'over PIL's
    decompression-bomb limit', not as an unreadable image.

Override: every loader takes `limits=InputLimits(...)`, e.g.
`load_dicom_folder(path, limits=InputLimits(max_file_bytes=2 * GiB))` for tomosynthesis stacks
larger than the default. The defaults are `DEFAULT_LIMITS`.
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
  """The bounds above; every field a positive integer."""

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
