"""MedNIST as users have it: the extracted folder or the MedNIST.tar.gz archive.

Layout: one subfolder per category (AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT) of JPEG
files, either directly under the given folder or under a single folder inside it (the archive
holds MedNIST/<category>/*.jpeg; pointing at the folder the archive was extracted into works too).
The archive is read as a stream: nothing is extracted to disk.

What is done with each file:
  * JPEG and PNG files (by extension) are decoded, converted to 8-bit grayscale and, when not
    already 64x64, resized to 64x64 (they are kept, not skipped; the count is logged).
  * Files with another extension are skipped as 'not an image file'; images that do not decode
    (truncated, corrupt) as 'unreadable image'.
  * A folder that is not a category is skipped as a whole, reported once as
    'unknown category folder' (in an archive, read once as a stream, its images are decoded
    with the others and then dropped); files beside the category folders are reported as
    'not in a category folder'.
  * Hidden files and folders (.DS_Store, ._*, .git) are ignored without a report entry.
Skipped paths are reported relative to the source root. MedNIST file names are serial numbers,
so nothing sensitive is in them; for folders of your own images, file names are yours to choose.

Images come back sorted by their path under the data root, so the folder and the archive of the
same data give identical arrays.
"""

import dataclasses
import io
import os
import posixpath
import tarfile
from typing import Callable, Iterator, Optional, Union
import zlib

from absl import logging
import numpy as np
from PIL import Image

from tff_medical import categories
from tff_medical.data import source
from tff_medical.errors import DataError

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')

REASON_UNKNOWN_FOLDER = 'unknown category folder'
REASON_NOT_IN_CATEGORY = 'not in a category folder'
REASON_NOT_IMAGE = 'not an image file'
REASON_UNREADABLE = 'unreadable image'
REASON_UNREADABLE_FILE = 'unreadable file'
REASON_DUPLICATE = 'duplicate archive member'

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


def _plan(relative_paths: list[str]) -> _Plan:
  """Labels files by their category folder. Pure, so folder and archive behave the same."""
  tops = {p.split('/', 1)[0] for p in relative_paths if '/' in p}
  prefix = ''
  if not tops & set(categories.CATEGORY_IDS) and len(tops) == 1:
    # One wrapping folder (MedNIST/ in the archive): it is the data root when it holds categories.
    (top,) = tops
    inner = {p.split('/')[1] for p in relative_paths if p.count('/') > 1}
    if inner & set(categories.CATEGORY_IDS):
      prefix = top + '/'

  images = {}
  skips = []
  unknown_folders = set()
  found_category_folder = False
  for path in relative_paths:
    rel = path[len(prefix):] if path.startswith(prefix) else None
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


def decode_image(data: bytes) -> tuple[np.ndarray, bool]:
  """Decodes JPEG/PNG bytes to a (64, 64) uint8 grayscale array; True when it was resized.

  The one pipeline for pictures, shared by training and inference. Raises whatever PIL raises
  for bytes that are not a readable JPEG or PNG.
  """
  # Only the formats the extensions promise: a renamed file never reaches another PIL plugin
  # (EPS would run Ghostscript on it).
  with Image.open(io.BytesIO(data), formats=('JPEG', 'PNG')) as image:
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


_Reader = Callable[[], Optional[bytes]]


def _decode_members(members: Iterator[tuple[str, _Reader]], source_name: str,
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
    # Outside the try below: a failing archive stream must end the load, not skip one file.
    data = read()
    if data is None:
      results[path] = REASON_UNREADABLE_FILE
      continue
    try:
      image, was_resized = decode_image(data)
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


def _load_folder(root: str, report: source.LoadReport):
  """Plans from the listing first, so that only images in category folders are decoded."""
  plan = _plan(source.visible_files(root))

  def reader(path: str) -> _Reader:
    def read():
      try:
        with open(os.path.join(root, *path.split('/')), 'rb') as f:
          return f.read()
      except OSError:  # Permissions, a file removed meanwhile: this file only.
        return None
    return read

  members = ((path, reader(path)) for path in plan.images)
  return plan, _assemble(plan, *_decode_members(members, report.source), report)


def _load_archive(path: str, report: source.LoadReport):
  """One streaming pass ('r|*': forward-only, nothing extracted or seeked; gzip detected).

  The data root is only known once every name has been seen, so every image member is decoded
  and the plan is applied afterwards; a second pass would cost more than the rare stray image.
  """
  names = []

  def members():
    with tarfile.open(path, mode='r|*') as archive:
      for member in archive:
        name = posixpath.normpath(member.name).lstrip('/')
        if member.isfile() and not _is_hidden(name):
          names.append(name)
          if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            yield name, lambda m=member, a=archive: a.extractfile(m).read()

  try:
    decoded = _decode_members(members(), report.source)
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise DataError(
        f'MedNIST archive {path} is truncated or corrupt ({type(e).__name__}); download it again.'
    ) from None
  plan = _plan(list(dict.fromkeys(names)))
  return plan, _assemble(plan, *decoded, report)


def load_mednist_with_keys(
    path: 'str | os.PathLike[str]') -> tuple[source.LabeledImages, list[str]]:
  """Like `load_mednist`, also returning each image's path under the data root ('Hand/001.jpeg').

  The keys are stable across the folder and the archive of the same data, so they can seed a
  deterministic split.
  """
  path = os.fspath(path)
  report = source.LoadReport(source=path)
  if os.path.isdir(path):
    plan, (images, labels, keys) = _load_folder(path, report)
  elif os.path.isfile(path):
    try:
      is_tar = tarfile.is_tarfile(path)
    except (EOFError, zlib.error, OSError):
      is_tar = False
    if not is_tar:
      raise DataError(f'MedNIST source {path} is neither a folder nor a tar archive '
                      '(expected MedNIST.tar.gz or its extracted folder).')
    plan, (images, labels, keys) = _load_archive(path, report)
  else:
    raise DataError(f'MedNIST source {path} does not exist.')

  report.loaded = len(keys)
  if not keys:
    if not plan.found_category_folder:
      raise DataError(
          f'No usable image in {path}: no category folder found (expected subfolders named '
          f'{", ".join(sorted(categories.CATEGORY_IDS))}). {report.summary()}.')
    raise DataError(f'No usable image in {path}. {report.summary()}.')
  logging.info('%s', report.summary())
  return source.LabeledImages(images=images, labels=labels, report=report), keys


def load_mednist(path: 'str | os.PathLike[str]') -> source.LabeledImages:
  """Loads MedNIST from its folder or its .tar.gz archive (auto-detected).

  Args:
    path: the MedNIST folder (one subfolder per category, or a folder holding it) or the
      MedNIST.tar.gz archive.

  Returns:
    All usable images, (N, 64, 64) uint8, sorted by path; labels index
    `categories.CATEGORY_IDS`; the report of the files skipped.

  Raises:
    DataError: the path does not exist or is neither a folder nor a tar archive, the archive is
      truncated or corrupt, or no file is a usable image.
  """
  images, _ = load_mednist_with_keys(path)
  return images
