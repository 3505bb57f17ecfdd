"""MedNIST as users have it: the extracted folder or the MedNIST.tar.gz archive (read as a stream).

Layout, what is kept and what is skipped with which reason: docs/DESIGN.md.
"""

import bz2
import contextlib
import dataclasses
import gzip
import io
import lzma
import os
import posixpath
import stat
import tarfile
from typing import Callable, Iterator, Union
import zlib

from absl import logging
import numpy as np
from PIL import Image

from tff_medical import categories
from tff_medical.data import limits as limits_lib
from tff_medical.data import source
from tff_medical.errors import DataError

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')

REASON_UNKNOWN_FOLDER = 'unknown category folder'
REASON_NOT_IN_CATEGORY = 'not in a category folder'
REASON_NOT_IMAGE = 'not an image file'
REASON_UNREADABLE = 'unreadable image'
REASON_UNREADABLE_FILE = limits_lib.REASON_UNREADABLE_FILE
REASON_DUPLICATE = 'duplicate archive member'
REASON_OUTSIDE_ROOT = 'not in the MedNIST folder'

# Archive members that carry a name or metadata for the next member, read whole by tarfile.
_EXTENDED_HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                          tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
# Far above any real name or pax record; a 1 GiB one would be read into memory by tarfile.
_MAX_EXTENDED_HEADER_BYTES = 1 * limits_lib.MiB

_SIZE = categories.IMAGE_SIZE


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What to do with every file of a source, decided from the paths alone."""

  # relative path -> (key under the data root, label), for the images to decode.
  images: dict[str, tuple[str, int]]
  # (path, reason) for what is skipped because of where it is or its extension.
  skips: list[tuple[str, str]]
  found_category_folder: bool


def _is_hidden(relative_path: str) -> bool:
  return any(part.startswith('.') for part in relative_path.split('/'))


class _SeveralRoots(Exception):
  """More than one top folder holds category folders (two copies of MedNIST, say)."""


def _plan(relative_paths: list[str]) -> _Plan:
  """Labels files by their category folder. Pure, so folder and archive behave the same.

  Raises:
    _SeveralRoots: with the folder names, when no top folder is a category and more than one
      holds category folders: which one is meant cannot be guessed.
  """
  tops = {p.split('/', 1)[0] for p in relative_paths if '/' in p}
  prefix = ''
  if not tops & set(categories.CATEGORY_IDS):
    # A wrapping folder (MedNIST/ in the archive) is the data root when it holds categories;
    # other folders beside it (an extracted __MACOSX/, notes) are reported, not fatal.
    roots = sorted({p.split('/', 2)[0] for p in relative_paths
                    if p.count('/') > 1 and p.split('/', 2)[1] in categories.LABEL_OF})
    if len(roots) > 1:
      raise _SeveralRoots(roots)
    if roots:
      prefix = roots[0] + '/'

  images = {}
  skips = []
  unknown_folders = set()
  outside_folders = set()
  found_category_folder = False
  for path in relative_paths:
    rel = path[len(prefix):] if path.startswith(prefix) else None
    if rel is None and '/' in path:
      top = path.split('/', 1)[0]
      if top not in outside_folders:
        outside_folders.add(top)
        skips.append((top + '/', REASON_OUTSIDE_ROOT))
      continue
    if rel is None or '/' not in rel:
      skips.append((path, REASON_NOT_IN_CATEGORY))
      continue
    folder = rel.split('/', 1)[0]
    if folder not in categories.LABEL_OF:
      if folder not in unknown_folders:
        unknown_folders.add(folder)
        skips.append((prefix + folder + '/', REASON_UNKNOWN_FOLDER))
      continue
    found_category_folder = True
    if os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
      skips.append((path, REASON_NOT_IMAGE))
      continue
    images[path] = (rel, categories.LABEL_OF[folder])
  return _Plan(images=images, skips=skips, found_category_folder=found_category_folder)


def _open_image(data: bytes, max_pixels: int) -> Image.Image:
  """Opens (header only) a JPEG or PNG whose size is within `max_pixels`."""
  try:
    # Only the formats the extensions promise: a renamed file never reaches another PIL plugin
    # (EPS would run Ghostscript on it).
    image = Image.open(io.BytesIO(data), formats=('JPEG', 'PNG'))
  except Image.DecompressionBombError:
    # PIL's own guard (MAX_IMAGE_PIXELS), reached only when max_image_pixels is raised above it.
    raise limits_lib.InputRefused(limits_lib.REASON_PIL_BOMB) from None
  width, height = image.size
  if width * height > max_pixels:
    image.close()
    raise limits_lib.InputRefused(limits_lib.REASON_TOO_MANY_PIXELS)
  return image


def decode_image(data: bytes, limits: limits_lib.InputLimits = limits_lib.DEFAULT_LIMITS,
                 ) -> tuple[np.ndarray, bool]:
  """Decodes JPEG/PNG bytes to a (64, 64) uint8 grayscale array; True when it was resized.

  The one pipeline for pictures, shared by training and inference.

  Raises:
    limits.InputRefused: the header declares more than `limits.max_image_pixels` pixels (checked
      before decoding), or PIL's decompression-bomb guard refused it.
    Whatever PIL raises for bytes that are not a readable JPEG or PNG.
  """
  with _open_image(data, limits.max_image_pixels) as image:
    # JPEG only: decode straight to grayscale and let the DCT scale large images down, which is
    # much faster than a full decode; the result is still at least 64x64 before the resize.
    image.draft('L', (_SIZE, _SIZE))
    image.load()
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
      # 16-bit PNG: PIL's convert('L') would clip instead of scale.
      array = np.asarray(image, dtype=np.float32) / 257.0
      image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode='L')
    elif image.mode != 'L':
      image = image.convert('L')
    resized = image.size != (_SIZE, _SIZE)
    if resized:
      image = image.resize((_SIZE, _SIZE), resample=Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8), resized


class _Buffer:
  """Images appended one at a time without a Python object per image."""

  def __init__(self, capacity: int = 1024):
    self._images = np.empty((capacity, _SIZE, _SIZE), np.uint8)
    self.size = 0

  def append(self, image: np.ndarray) -> int:
    if self.size == len(self._images):
      grown = np.empty((2 * self.size, _SIZE, _SIZE), np.uint8)
      grown[:self.size] = self._images
      self._images = grown
    self._images[self.size] = image
    self.size += 1
    return self.size - 1

  def take(self, indices: list[int]) -> np.ndarray:
    return self._images[np.array(indices, dtype=np.int64).reshape(-1)]


# Returns the bytes of one file; raises limits.InputRefused for a file that is not read.
_Reader = Callable[[], bytes]


def _decode_members(members: Iterator[tuple[str, _Reader]], source_name: str,
                    limits: limits_lib.InputLimits,
                    ) -> tuple[_Buffer, dict[str, Union[int, str]], list[str]]:
  """Decodes members as they come: path -> buffer index or skip reason; and repeated paths."""
  buffer = _Buffer()
  results = {}
  repeated = []
  resized = 0
  for path, read in members:
    if path in results:
      repeated.append(path)  # A tar archive may hold a name twice; the first one is used.
      continue
    try:
      # Only InputRefused is caught: a failing archive stream must end the load, not skip a file.
      data = read()
    except limits_lib.InputRefused as refused:
      results[path] = refused.reason
      continue
    try:
      image, was_resized = decode_image(data, limits)
    except limits_lib.InputRefused as refused:
      results[path] = refused.reason
      continue
    except Exception:  # pylint: disable=broad-except
      # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...) for
      # bad files; any of them means this one file is unusable, not that the run must stop.
      results[path] = REASON_UNREADABLE
      continue
    resized += was_resized
    results[path] = buffer.append(image)
  if resized:
    logging.info('%s: %d images were not %dx%d and were resized.', source_name, resized, _SIZE,
                 _SIZE)
  return buffer, results, repeated


def _assemble(plan: _Plan, buffer: _Buffer, results: dict[str, Union[int, str]],
              repeated: list[str], report: source.LoadReport):
  """The planned images that decoded, sorted by key; everything else goes to the report."""
  for path, reason in plan.skips:
    report.skip(path, reason)
  kept = []
  for path, (key, label) in plan.images.items():
    result = results[path]
    if isinstance(result, str):
      report.skip(path, result)
    else:
      kept.append((key, label, result))
  for path in repeated:
    if path in plan.images:
      report.skip(path, REASON_DUPLICATE)
  kept.sort()
  images = buffer.take([index for _, _, index in kept])
  labels = np.array([label for _, label, _ in kept], dtype=np.int32)
  return images, labels, [key for key, _, _ in kept]


def _load_folder(root: str, report: source.LoadReport, limits: limits_lib.InputLimits):
  """Plans from the listing first, so that only images in category folders are decoded."""
  plan = _plan(source.visible_files(root))

  def reader(path: str) -> _Reader:
    # FIFOs, devices, oversized files, permissions, a file removed meanwhile: this file only.
    return lambda: limits_lib.read_regular_file(os.path.join(root, *path.split('/')),
                                                limits.max_file_bytes)

  members = ((path, reader(path)) for path in plan.images)
  return plan, _assemble(plan, *_decode_members(members, report.source, limits), report)


class _ArchiveRefused(Exception):
  """The archive exceeds a limit that applies to it as a whole; the message says which."""


def _bounded_tarinfo() -> type:
  """A TarInfo that refuses oversized extended headers before tarfile reads them whole."""

  class _BoundedTarInfo(tarfile.TarInfo):

    @classmethod
    def frombuf(cls, buf, encoding, errors):
      info = super().frombuf(buf, encoding, errors)
      if info.type in _EXTENDED_HEADER_TYPES and info.size > _MAX_EXTENDED_HEADER_BYTES:
        raise _ArchiveRefused(f'an extended header of {info.size} bytes (at most '
                              f'{_MAX_EXTENDED_HEADER_BYTES})')
      return info

  return _BoundedTarInfo


def _refused(reason: str) -> _Reader:
  def read():
    raise limits_lib.InputRefused(reason)
  return read


@contextlib.contextmanager
def _uncompressed(path: str):
  """The archive's bytes as a stream, decompressed as tarfile's 'r|*' would detect.

  Decompressed here rather than by tarfile: tarfile's own stream skips a member by reading it in
  10 KiB steps, each copying whatever a deflate step produced (up to 10 MB of zeros), so that
  skipping a 1 GiB member of zeros took minutes. gzip/bz2/lzma files read in bounded steps.
  """
  with open(path, 'rb') as raw:
    magic = raw.read(10)
    raw.seek(0)
    if magic.startswith(b'\x1f\x8b\x08'):
      opener = lambda f: gzip.GzipFile(fileobj=f, mode='rb')
    elif magic[:3] == b'BZh' and magic[4:10] == b'1AY&SY':
      opener = bz2.BZ2File
    elif magic.startswith((b'\x5d\x00\x00\x80', b'\xfd7zXZ')):
      opener = lzma.LZMAFile
    else:
      yield raw
      return
    with opener(raw) as stream:
      yield stream


def _load_archive(path: str, report: source.LoadReport, limits: limits_lib.InputLimits):
  """One streaming pass ('r|': forward-only, nothing extracted or seeked; compression detected).

  The data root is only known once every name has been seen, so every image member is decoded
  and the plan is applied afterwards; a second pass would cost more than the rare stray image.
  Sizes come from each member's header, so limits are checked before its data is read.
  """
  names = []

  def members():
    with _uncompressed(path) as stream, tarfile.open(fileobj=stream, mode='r|',
                                                     tarinfo=_bounded_tarinfo()) as archive:
      count = 0
      while (member := archive.next()) is not None:
        # A stream keeps every member it has seen; nothing here looks back, so let them go
        # (a million tiny members would otherwise hold about a GB).
        archive.members.clear()
        count += 1
        if count > limits.max_archive_members:
          raise _ArchiveRefused(f'more than max_archive_members={limits.max_archive_members} '
                                'members')
        # Checked before the data is read or skipped: skipping inflates it too.
        if member.offset_data + member.size > limits.max_archive_bytes:
          raise _ArchiveRefused(f'more than max_archive_bytes={limits.max_archive_bytes} '
                                'bytes uncompressed')
        name = posixpath.normpath(member.name).lstrip('/')
        if member.isdir() or _is_hidden(name):
          continue
        names.append(name)
        if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
          continue  # The plan reports it as 'not an image file' (or by its folder).
        if not member.isfile():
          # Links are not followed (a stream cannot seek back to a hard link's target, and a
          # symlink points outside the archive); devices and FIFOs hold no image.
          yield name, _refused(limits_lib.REASON_NOT_REGULAR)
        elif member.size > limits.max_member_bytes:
          yield name, _refused(limits_lib.REASON_MEMBER_TOO_LARGE)
        else:
          yield name, lambda m=member, a=archive: a.extractfile(m).read()

  try:
    decoded = _decode_members(members(), report.source, limits)
  except _ArchiveRefused as e:
    raise DataError(f'MedNIST archive {path} is refused: it holds {e}. Raise the limit '
                    '(tff_medical.data.limits.InputLimits) if the archive is trusted.') from None
  except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
    raise DataError(
        f'MedNIST archive {path} is truncated or corrupt ({type(e).__name__}); download it again.'
    ) from None
  plan = _plan(list(dict.fromkeys(names)))
  return plan, _assemble(plan, *decoded, report)


def load_mednist_with_keys(
    path: 'str | os.PathLike[str]',
    limits: limits_lib.InputLimits = limits_lib.DEFAULT_LIMITS,
) -> tuple[source.LabeledImages, list[str]]:
  """Like `load_mednist`, also returning each image's path under the data root ('Hand/001.jpeg').

  The keys are stable across the folder and the archive of the same data, so they can seed a
  deterministic split.
  """
  path = os.fspath(path)
  limits = limits_lib.check_limits(limits)
  report = source.LoadReport(source=path)
  try:
    mode = os.stat(path).st_mode
  except OSError:
    raise DataError(f'MedNIST source {path} does not exist.') from None
  try:
    if stat.S_ISDIR(mode):
      plan, (images, labels, keys) = _load_folder(path, report, limits)
    elif stat.S_ISREG(mode):
      try:
        is_tar = tarfile.is_tarfile(path)
      except (EOFError, zlib.error, OSError):
        is_tar = False
      if not is_tar:
        raise DataError(f'MedNIST source {path} is neither a folder nor a tar archive '
                        '(expected MedNIST.tar.gz or its extracted folder).')
      plan, (images, labels, keys) = _load_archive(path, report, limits)
    else:
      # Never opened: a FIFO would block, a device would never end.
      raise DataError(f'MedNIST source {path} is neither a folder nor a regular file '
                      '(expected MedNIST.tar.gz or its extracted folder).')
  except _SeveralRoots as e:
    raise DataError(f'MedNIST source {path} holds category folders in several folders '
                    f'({", ".join(f + "/" for f in e.args[0])}); point data_dir at one of '
                    'them.') from None

  report.loaded = len(keys)
  if not keys:
    if not plan.found_category_folder:
      raise DataError(
          f'No usable image in {path}: no category folder found (expected subfolders named '
          f'{", ".join(sorted(categories.CATEGORY_IDS))}). {report.summary()}.')
    raise DataError(f'No usable image in {path}. {report.summary()}.')
  logging.info('%s', report.summary())
  return source.LabeledImages(images=images, labels=labels, report=report), keys


def load_mednist(path: 'str | os.PathLike[str]',
                 limits: limits_lib.InputLimits = limits_lib.DEFAULT_LIMITS,
                 ) -> source.LabeledImages:
  """Loads MedNIST from its folder or its .tar.gz archive (auto-detected).

  Args:
    path: the MedNIST folder (one subfolder per category, or a folder holding it) or the
      MedNIST.tar.gz archive.
    limits: the input limits checked before decoding (see data/limits.py).

  Returns:
    All usable images, (N, 64, 64) uint8, sorted by path; labels index
    `categories.CATEGORY_IDS`; the report of the files skipped.

  Raises:
    DataError: the path does not exist or is neither a folder nor a tar archive, the archive is
      truncated, corrupt or above its limits, or no file is a usable image.
  """
  images, _ = load_mednist_with_keys(path, limits)
  return images
