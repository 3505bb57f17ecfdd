"""A folder of DICOM files, labelled from their metadata and displayed as a radiologist's viewer.

Category. Each file's category comes from its Modality, BodyPartExamined, StudyDescription and
SeriesDescription through a `DicomMapping`: rules kept as data (the default is
dicom_mapping.json beside this module; its "description" field states the matching rules).
Users add rules with a JSON file of the same format (`extra_mapping_path`) or replace the
default (`mapping`). Files that match no rule are skipped as 'no category for metadata', files
that match rules of two categories as 'ambiguous category for metadata'.

Pixels, in the order a viewer applies them: the middle frame of a multi-frame image; the
Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence, per-frame functional groups of
enhanced images included); the VOI LUT Sequence or the first Window Center/Width when present,
else the min-max range of the image; MONOCHROME1 inverted; color (RGB, YBR) to luminance; then
padded with black to a square (so anatomy keeps its proportions) and resized to 64x64 uint8
(area averaging when shrinking). pydicom decodes what it can natively; JPEG-LS, 12-bit JPEG and
some JPEG 2000 files need the pylibjpeg or gdcm plugins and are skipped without them.

Input limits (data/limits.py) are checked before any pixel is decoded: only regular files are
opened, files above max_file_bytes are not read, a deflated dataset is inflated in bounded steps
and skipped above max_inflated_bytes before pydicom inflates it, and Rows x Columns x
SamplesPerPixel (one frame) and the whole declared pixel data are checked against
max_image_pixels and max_dicom_pixel_bytes. Each refusal is a skip reason of the report.

Patient identifiers never leave this module:
  * Only the tags named in `_TAGS` are read (pydicom's `specific_tags`), plus the file meta group
    that pydicom always reads to learn the transfer syntax. PatientName, PatientID, dates, UIDs
    of the dataset, institution and the like are never parsed.
  * Nothing from the header except the category reaches the returned object; skip reasons are
    fixed strings; errors and logs never quote header values.
  * pydicom's own warnings and log records (which can quote values, e.g. in debug mode or on an
    invalid value) are silenced while a file is read. This changes the 'pydicom' logger's level
    process-wide for that moment; the previous level is restored.
  * Skipped files are reported as 'file #<n>' by default, n being the index in
    `list_dicom_files(root)`, because DICOM exports often name files and folders after the
    patient or the SOP Instance UID. The operator, who has the folder, resolves n locally;
    `skipped_paths=PathReport.RELATIVE` reports paths relative to the root instead, for folders
    whose names the user knows to be safe. The root itself appears only in error messages,
    which go to the operator who passed it, never in the report.
"""

import contextlib
import dataclasses
import enum
import importlib.resources
import json
import logging as std_logging
import os
import re
from typing import Any, BinaryIO, Mapping, Optional, Union
import warnings
import zlib

from absl import logging
import numpy as np
from PIL import Image
import pydicom
from pydicom import errors as pydicom_errors
from pydicom import filereader as pydicom_filereader
from pydicom import multival
from pydicom import pixels as pydicom_pixels
from pydicom import uid as pydicom_uid

from tff_medical import categories
from tff_medical.data import limits as limits_lib
from tff_medical.data import source
from tff_medical.errors import DataError

_SIZE = categories.IMAGE_SIZE

# The header elements read from each file, and nothing else. Mapping first, then pixel handling.
_TAGS = (
    'Modality', 'BodyPartExamined', 'StudyDescription', 'SeriesDescription',
    'SamplesPerPixel', 'PhotometricInterpretation', 'PlanarConfiguration', 'NumberOfFrames',
    'Rows', 'Columns', 'BitsAllocated', 'BitsStored', 'HighBit', 'PixelRepresentation',
    'PixelData', 'FloatPixelData', 'DoubleFloatPixelData',
    'ExtendedOffsetTable', 'ExtendedOffsetTableLengths',
    'RescaleSlope', 'RescaleIntercept', 'RescaleType', 'ModalityLUTSequence',
    'VOILUTSequence', 'WindowCenter', 'WindowWidth', 'VOILUTFunction',
    'SharedFunctionalGroupsSequence', 'PerFrameFunctionalGroupsSequence',
)
_PIXEL_DATA_TAGS = ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')
# Enhanced (multi-frame) images keep rescale and window in functional groups, not at top level.
_FUNCTIONAL_GROUP_MACROS = (
    ('PixelValueTransformationSequence', ('RescaleSlope', 'RescaleIntercept', 'RescaleType')),
    ('FrameVOILUTSequence', ('WindowCenter', 'WindowWidth', 'VOILUTFunction')),
)

REASON_NOT_DICOM = 'not a DICOM file'
REASON_UNREADABLE = 'unreadable DICOM file'
REASON_NO_PIXELS = 'no pixel data'
REASON_NO_CATEGORY = 'no category for metadata'
REASON_AMBIGUOUS = 'ambiguous category for metadata'
REASON_PHOTOMETRIC = 'unsupported photometric interpretation'
REASON_UNDECODABLE = 'undecodable compressed pixel data'
REASON_BAD_PIXELS = 'unreadable pixel data'

_MAPPING_KEYS = frozenset({'description', 'rules'})
_RULE_KEYS = frozenset({'category', 'modalities', 'body_parts', 'keywords'})
_WORD = re.compile(r'[A-Z0-9]+')


class PathReport(enum.Enum):
  """How skipped files are named in the report."""
  PSEUDONYMIZED = 'pseudonymized'  # 'file #<index in list_dicom_files(root)>'
  RELATIVE = 'relative'  # the path relative to the root


@dataclasses.dataclass(frozen=True)
class MappingRule:
  """Files of one of `modalities` whose body part or description names this category."""

  category: str
  modalities: frozenset[str]
  body_parts: frozenset[str]
  keywords: frozenset[str]


def _words(where: str, index: int, rule: Mapping[str, Any], key: str,
           required: bool) -> frozenset[str]:
  values = rule.get(key, [])
  if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
    raise DataError(f'{where}: rule {index} "{key}" must be a list of non-empty strings. '
                    f'Found {values!r}.')
  if required and not values:
    raise DataError(f'{where}: rule {index} "{key}" must not be empty.')
  return frozenset(v.strip().upper() for v in values)


@dataclasses.dataclass(frozen=True)
class DicomMapping:
  """Rules from DICOM metadata to categories: `default()`, `from_dict()`, `from_json_file()`."""

  rules: tuple[MappingRule, ...]

  @classmethod
  def from_dict(cls, data: Any, where: str = 'DICOM mapping') -> 'DicomMapping':
    """Validates the JSON structure (see dicom_mapping.json); raises DataError naming the fault."""
    if not isinstance(data, dict) or not isinstance(data.get('rules'), list):
      raise DataError(f'{where} must be a JSON object with a "rules" list.')
    unknown = set(data) - _MAPPING_KEYS
    if unknown:
      raise DataError(f'{where}: unknown keys {sorted(unknown)}. Allowed: {sorted(_MAPPING_KEYS)}.')
    rules = []
    for index, rule in enumerate(data['rules']):
      if not isinstance(rule, dict):
        raise DataError(f'{where}: rule {index} must be a JSON object. Found {rule!r}.')
      unknown = set(rule) - _RULE_KEYS
      if unknown:
        # A misspelt key would silently match nothing.
        raise DataError(f'{where}: rule {index} has unknown keys {sorted(unknown)}. '
                        f'Allowed: {sorted(_RULE_KEYS)}.')
      category = rule.get('category')
      if not isinstance(category, str):
        raise DataError(f'{where}: rule {index} needs a "category" string. Found {category!r}.')
      try:
        categories.label_of(category)
      except DataError as e:
        raise DataError(f'{where}: rule {index}: {e}') from None
      keywords = _words(where, index, rule, 'keywords', required=False)
      for keyword in keywords:
        if not _WORD.fullmatch(keyword):
          # Descriptions are split into words of letters and digits, so this could never match.
          raise DataError(f'{where}: rule {index} keyword {keyword!r} must be a single word of '
                          'letters and digits.')
      body_parts = _words(where, index, rule, 'body_parts', required=False)
      if not keywords and not body_parts:
        raise DataError(f'{where}: rule {index} needs "body_parts" or "keywords".')
      rules.append(MappingRule(
          category=category,
          modalities=_words(where, index, rule, 'modalities', required=True),
          body_parts=body_parts,
          keywords=keywords,
      ))
    return cls(rules=tuple(rules))

  @classmethod
  def from_json_file(cls, path: 'str | os.PathLike[str]') -> 'DicomMapping':
    path = os.fspath(path)
    try:
      with open(path, encoding='utf-8') as f:
        data = json.load(f)
    except OSError as e:
      raise DataError(f'Cannot read DICOM mapping {path}: {e.strerror}.') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f'DICOM mapping {path} is not valid JSON: {e}.') from None
    return cls.from_dict(data, where=f'DICOM mapping {path}')

  @classmethod
  def default(cls) -> 'DicomMapping':
    text = importlib.resources.files(__package__).joinpath('dicom_mapping.json').read_text()
    return cls.from_dict(json.loads(text), where='default DICOM mapping')

  def extended(self, other: 'DicomMapping') -> 'DicomMapping':
    return DicomMapping(rules=self.rules + other.rules)

  def category_for(self, modality: str, body_part: str,
                   descriptions: tuple[str, ...]) -> tuple[Optional[str], Optional[str]]:
    """Returns (category, None) or (None, skip reason). Body part first, then keywords."""
    modality = modality.strip().upper()
    body_part = body_part.strip().upper()
    rules = [r for r in self.rules if modality in r.modalities]
    found = {r.category for r in rules if body_part and body_part in r.body_parts}
    if not found:
      words = set(_WORD.findall(' '.join((body_part,) + descriptions).upper()))
      found = {r.category for r in rules if r.keywords & words}
    if len(found) == 1:
      return found.pop(), None
    # Several categories: a guess would put wrong labels into training.
    return None, REASON_AMBIGUOUS if found else REASON_NO_CATEGORY


class UnusableDicomError(DataError):
  """One DICOM file cannot be used; `reason` is one of the fixed REASON_* strings."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


_Skip = UnusableDicomError  # Short name inside this module (and in export/predict.py).


@contextlib.contextmanager
def _quiet_pydicom():
  """Silences pydicom's warnings and logs, which may quote header values."""
  logger = std_logging.getLogger('pydicom')
  level = logger.level
  # Above CRITICAL: also its child loggers (pydicom.pixels.*), which inherit the level.
  logger.setLevel(std_logging.CRITICAL + 1)
  try:
    with warnings.catch_warnings(), np.errstate(all='ignore'):
      warnings.simplefilter('ignore')
      yield
  finally:
    logger.setLevel(level)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
  value = ds.get(keyword)
  if value is None:
    return ''
  if isinstance(value, multival.MultiValue):
    return ' '.join(str(v) for v in value)
  return str(value)


def _use_functional_groups(ds: pydicom.Dataset, frame: int) -> None:
  """Copies an enhanced image's rescale and window for `frame` to the top level."""
  items = []
  per_frame = ds.get('PerFrameFunctionalGroupsSequence')
  if per_frame and frame < len(per_frame):
    items.append(per_frame[frame])
  shared = ds.get('SharedFunctionalGroupsSequence')
  if shared:
    items.append(shared[0])
  for macro, keywords in _FUNCTIONAL_GROUP_MACROS:
    if any(k in ds for k in keywords):
      continue
    for item in items:  # Per-frame values override shared ones (PS3.3 C.7.6.16).
      if item.get(macro):
        for keyword in keywords:
          if keyword in item[macro][0]:
            ds[keyword] = item[macro][0][keyword]
        break


def _display(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
  """Stored values after the Modality LUT -> display values in [0, 255], float."""
  values = np.nan_to_num(np.asarray(values, dtype=np.float64))
  lut_items = ds.get('VOILUTSequence')
  has_lut = bool(lut_items) and 'LUTDescriptor' in lut_items[0] and 'LUTData' in lut_items[0]
  has_window = bool(ds.get('WindowCenter') is not None and ds.get('WindowWidth') is not None)
  shown = None
  try:
    if has_lut:
      # The VOI LUT branch of apply_voi_lut; its output range is that of the LUT itself.
      count, first, _ = lut_items[0].LUTDescriptor
      domain = np.arange(first, first + (count or 2**16), dtype=np.int64)
      outputs = pydicom_pixels.apply_voi(domain, ds).astype(np.float64)
      shown = pydicom_pixels.apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
      low, high = outputs.min(), outputs.max()
    elif has_window:
      # The windowing branch of apply_voi_lut. pydicom maps the window onto a range that depends
      # on Bits Stored and the rescale; infinities find that range without re-deriving it.
      shown = pydicom_pixels.apply_windowing(values, ds)
      low, high = pydicom_pixels.apply_windowing(np.array([-np.inf, np.inf]), ds)
  except (ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError):
    # A window width below 1 or an unknown VOI function: show the whole range instead.
    shown = None
  if shown is None or not high > low:
    shown, low, high = values, values.min(), values.max()
    if not high > low:
      return np.zeros_like(values)
  return (shown - low) * (255.0 / (high - low))


def _to_model_image(display: np.ndarray) -> np.ndarray:
  """Pads a [0, 255] float image with black to a square and resizes it to 64x64 uint8."""
  rows, cols = display.shape
  side = max(rows, cols)
  if rows != cols:
    square = np.zeros((side, side), np.float64)
    top, left = (side - rows) // 2, (side - cols) // 2
    square[top:top + rows, left:left + cols] = display
    display = square
  if side != _SIZE:
    # BOX (area average) when shrinking keeps fine detail from aliasing; BILINEAR to enlarge.
    resample = Image.Resampling.BOX if side > _SIZE else Image.Resampling.BILINEAR
    image = Image.fromarray(display.astype(np.float32), mode='F')
    display = np.asarray(image.resize((_SIZE, _SIZE), resample=resample), dtype=np.float64)
  return np.clip(np.rint(display), 0, 255).astype(np.uint8)


def _check_pixel_size(ds: pydicom.Dataset, limits: limits_lib.InputLimits) -> None:
  """Refuses, from the header alone, an image too large to decode; raises _Skip."""
  rows = int(ds.get('Rows', 0) or 0)
  columns = int(ds.get('Columns', 0) or 0)
  samples = int(ds.get('SamplesPerPixel', 1) or 1)
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  bits = int(ds.get('BitsAllocated', 8) or 8)
  frame_pixels = max(rows, 0) * max(columns, 0) * max(samples, 1)
  if frame_pixels > limits.max_image_pixels:
    raise _Skip(limits_lib.REASON_TOO_MANY_PIXELS)
  if frame_pixels * max(frames, 1) * -(-max(bits, 1) // 8) > limits.max_dicom_pixel_bytes:
    raise _Skip(limits_lib.REASON_PIXEL_DATA_TOO_LARGE)


def _pixels(ds: pydicom.Dataset, limits: limits_lib.InputLimits) -> np.ndarray:
  """The (64, 64) uint8 image of a dataset; raises _Skip."""
  _check_pixel_size(ds, limits)
  samples = int(ds.get('SamplesPerPixel', 1) or 1)
  photometric = _text(ds, 'PhotometricInterpretation').strip().upper()
  if not photometric or samples not in (1, 3):
    raise _Skip(REASON_BAD_PIXELS)  # Not an image module a viewer could show.
  if samples == 1 and photometric not in ('MONOCHROME1', 'MONOCHROME2'):
    raise _Skip(REASON_PHOTOMETRIC)  # PALETTE COLOR and the like
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  middle = frames // 2
  try:
    # One frame only: a 500-frame series is not decoded whole for the one frame kept.
    stored = pydicom_pixels.pixel_array(ds, index=middle)
  except Exception:  # pylint: disable=broad-except
    # Decoders raise many types; none of their messages reach the report.
    transfer_syntax = getattr(ds, 'file_meta', {}).get('TransferSyntaxUID')
    if transfer_syntax is not None and transfer_syntax.is_compressed:
      raise _Skip(REASON_UNDECODABLE) from None
    raise _Skip(REASON_BAD_PIXELS) from None
  if stored.ndim == 3 and samples == 3:
    # pydicom returns YBR as RGB. ITU-R BT.601 luma, as a grayscale viewer shows color.
    bits = int(ds.get('BitsStored', 8) or 8)
    luma = stored.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return _to_model_image(luma * (255.0 / (2**bits - 1)))
  if stored.ndim != 2:
    raise _Skip(REASON_BAD_PIXELS)
  _use_functional_groups(ds, middle)
  display = _display(pydicom_pixels.apply_modality_lut(stored, ds), ds)
  if photometric == 'MONOCHROME1':
    display = 255.0 - display  # Low values are white in MONOCHROME1.
  return _to_model_image(display)


def _set_raw_transfer_syntax(ds: pydicom.Dataset) -> None:
  """Gives a dataset read without file meta the transfer syntax pydicom's decoder needs.

  Such a dataset (no preamble) is uncompressed, in the encoding pydicom detected while reading.
  """
  if 'TransferSyntaxUID' in getattr(ds, 'file_meta', {}):
    return
  implicit_vr, little_endian = ds.original_encoding
  if implicit_vr:
    syntax = pydicom_uid.ImplicitVRLittleEndian
  else:
    syntax = (pydicom_uid.ExplicitVRLittleEndian if little_endian else
              pydicom_uid.ExplicitVRBigEndian)
  if getattr(ds, 'file_meta', None) is None:
    ds.file_meta = pydicom.dataset.FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = syntax


_INFLATE_CHUNK = 64 * 1024  # Inflates to at most ~66 MB (deflate's ratio is below 1032:1).


def _check_inflated_size(fp: BinaryIO, force: bool, max_bytes: int) -> None:
  """Inflates a deflated dataset in bounded steps, keeping nothing; raises _Skip above max_bytes.

  pydicom inflates the whole dataset in one call before it parses anything, so a 133 KB file of
  deflated zeros would become gigabytes before any header check could run. `fp` is left where
  it was.
  """
  start = fp.tell()
  try:
    pydicom_filereader.read_preamble(fp, force)
    # pydicom's own file meta reader (private, pinned pydicom 3.0), so that this check and
    # dcmread agree on the transfer syntax.
    meta = pydicom_filereader._read_file_meta_info(fp)  # pylint: disable=protected-access
    if meta.get('TransferSyntaxUID') != pydicom_uid.DeflatedExplicitVRLittleEndian:
      return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    while chunk := fp.read(_INFLATE_CHUNK):
      try:
        inflated += len(inflater.decompress(chunk))
      except zlib.error:
        raise _Skip(REASON_UNREADABLE) from None
      if inflated > max_bytes:
        raise _Skip(limits_lib.REASON_INFLATED_TOO_LARGE)
  finally:
    fp.seek(start)


def _read_dataset(source: Any, force: bool, limits: limits_lib.InputLimits) -> pydicom.Dataset:
  """Reads `_TAGS` of one file that has pixel data; raises _Skip. Call inside _quiet_pydicom.

  A path is opened only if it is a regular file within `limits.max_file_bytes`.
  """
  if not hasattr(source, 'read'):
    try:
      with limits_lib.open_regular_file(os.fspath(source), limits.max_file_bytes) as f:
        return _read_dataset(f, force, limits)
    except limits_lib.InputRefused as refused:
      raise _Skip(refused.reason) from None
  try:
    _check_inflated_size(source, force, limits.max_inflated_bytes)
    ds = pydicom.dcmread(source, specific_tags=list(_TAGS), force=force)
  except _Skip:
    raise
  except pydicom_errors.InvalidDicomError:
    raise _Skip(REASON_NOT_DICOM) from None
  except Exception:  # pylint: disable=broad-except
    # Truncated or malformed files raise many types from the parser.
    raise _Skip(REASON_UNREADABLE) from None
  if len(ds) == 0:  # pylint: disable=g-explicit-length-test
    # What pydicom returns for a file cut inside a sequence (e.g. compressed pixel data).
    raise _Skip(REASON_UNREADABLE)
  if not any(tag in ds for tag in _PIXEL_DATA_TAGS):
    raise _Skip(REASON_NO_PIXELS)
  if force:
    _set_raw_transfer_syntax(ds)
  return ds


def read_dicom_image(source: 'str | os.PathLike[str] | BinaryIO', *, force: bool = False,
                     limits: limits_lib.InputLimits = limits_lib.DEFAULT_LIMITS) -> np.ndarray:
  """One DICOM file as the (64, 64) uint8 image training sees, whatever its metadata.

  For inference on single files: no category mapping, same pixel handling and the same privacy
  guarantees as `load_dicom_folder`.

  Args:
    source: a path or a binary file object.
    force: also read files without the 128-byte preamble and 'DICM' (old or raw datasets),
      taken as uncompressed in the encoding pydicom detects.
    limits: the input limits (data/limits.py); max_file_bytes applies to a path only, a file
      object is the caller's to bound.

  Raises:
    UnusableDicomError: with a fixed `reason` (never header content).
  """
  limits = limits_lib.check_limits(limits)
  with _quiet_pydicom():
    ds = _read_dataset(source, force, limits)
    try:
      return _pixels(ds, limits)
    except _Skip:
      raise
    except Exception:  # pylint: disable=broad-except
      # A value that does not parse (e.g. NumberOfFrames '1A'); its text must not be reported.
      raise _Skip(REASON_UNREADABLE) from None


def _read(path: str, mapping: DicomMapping,
          limits: limits_lib.InputLimits) -> tuple[np.ndarray, int]:
  """Reads one file of a folder; returns (image, label) or raises _Skip."""
  ds = _read_dataset(path, False, limits)
  try:
    category, reason = mapping.category_for(
        _text(ds, 'Modality'), _text(ds, 'BodyPartExamined'),
        (_text(ds, 'StudyDescription'), _text(ds, 'SeriesDescription')))
    if category is None:
      raise _Skip(reason)
    return _pixels(ds, limits), categories.LABEL_OF[category]
  except _Skip:
    raise
  except Exception:  # pylint: disable=broad-except
    # A value that does not parse (e.g. NumberOfFrames '1A'); its text must not be reported.
    raise _Skip(REASON_UNREADABLE) from None


def list_dicom_files(path: 'str | os.PathLike[str]') -> list[str]:
  """The files a load considers, relative to `path`, in load order: 'file #n' is entry n.

  Hidden files and folders and DICOMDIR index files are left out.
  """
  return [p for p in source.visible_files(os.fspath(path))
          if p.rsplit('/', 1)[-1].upper() != 'DICOMDIR']


def load_dicom_folder(
    path: 'str | os.PathLike[str]',
    mapping: Optional[Union[DicomMapping, Mapping[str, Any]]] = None,
    extra_mapping_path: Optional['str | os.PathLike[str]'] = None,
    *,
    skipped_paths: PathReport = PathReport.PSEUDONYMIZED,
    limits: limits_lib.InputLimits = limits_lib.DEFAULT_LIMITS,
) -> source.LabeledImages:
  """Loads every DICOM image under `path` (recursively) whose metadata maps to a category.

  Args:
    path: the folder.
    mapping: rules replacing the default: a `DicomMapping` or a dict in dicom_mapping.json's
      format. None uses the default rules.
    extra_mapping_path: a JSON file of rules added to `mapping` (or to the default).
    skipped_paths: how skipped files are named in the report (see the module docstring).
    limits: the input limits checked before decoding (see data/limits.py).

  Returns:
    The images (N, 64, 64) uint8 in file order, their labels, and the report of skipped files.

  Raises:
    DataError: `path` is not a folder, a mapping is invalid (unknown category, bad format), or
      no file is a usable image.
  """
  root = os.fspath(path)
  if not isinstance(skipped_paths, PathReport):
    raise DataError(f'skipped_paths must be a PathReport. Found {skipped_paths!r}.')
  limits = limits_lib.check_limits(limits)
  if mapping is None:
    rules = DicomMapping.default()
  elif isinstance(mapping, DicomMapping):
    rules = mapping
  else:
    rules = DicomMapping.from_dict(mapping)
  if extra_mapping_path is not None:
    rules = rules.extended(DicomMapping.from_json_file(extra_mapping_path))
  if not os.path.isdir(root):
    raise DataError(f'DICOM folder {root} does not exist or is not a folder.')

  pseudonymized = skipped_paths is PathReport.PSEUDONYMIZED
  report = source.LoadReport(source='DICOM folder' if pseudonymized else root)
  images, labels = [], []
  with _quiet_pydicom():
    for index, relative in enumerate(list_dicom_files(root)):
      try:
        image, label = _read(os.path.join(root, relative), rules, limits)
      except _Skip as skip:
        report.skip(f'file #{index}' if pseudonymized else relative, skip.reason)
        continue
      images.append(image)
      labels.append(label)
  report.loaded = len(images)
  if not images:
    raise DataError(f'No usable image in DICOM folder {root}. {report.summary()}.')
  logging.info('%s', report.summary())
  return source.LabeledImages(images=np.stack(images), labels=np.array(labels, np.int32),
                              report=report)
