"""Classifies image files (PNG, JPEG, DICOM) with an exported SavedModel.

How files are recognised and converted, and how failures are reported: docs/DESIGN.md.
"""

import dataclasses
import io
import json
import os
from typing import Any, Iterable, Iterator, Sequence, TextIO, Union

import numpy as np
import tensorflow as tf

from tff_medical import categories
from tff_medical.data import dicom
from tff_medical.data import limits as limits_lib
from tff_medical.data import mednist
from tff_medical.errors import TffMedicalError
from tff_medical.export import saved_model

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_JPEG_SIGNATURE = b'\xff\xd8\xff'
_DICOM_MAGIC_OFFSET = 128
_BATCH_SIZE = 64
_SIZE = categories.IMAGE_SIZE

REASON_UNSUPPORTED = 'unsupported format; expected PNG, JPEG or DICOM'


class ModelDirError(TffMedicalError):
  """A --model_dir that is not an export of saved_model.export_saved_model."""


class UnreadableImageError(TffMedicalError):
  """One file cannot be used, for `reason` (a fixed phrase: no header content)."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Prediction:
  path: str
  category_id: str
  display_name: str
  privacy_level: str
  probability: float

  def line(self) -> str:
    return (f'{self.path}  {self.display_name}  (privacy: {self.privacy_level})  '
            f'p={self.probability:.2f}')


@dataclasses.dataclass(frozen=True)
class ReadFailure:
  path: str
  reason: str

  def line(self) -> str:
    return f'{self.path}: cannot read image ({self.reason})'


Result = Union[Prediction, ReadFailure]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """An export's serving function and the object that owns its variables.

  The loaded object is kept because a signature alone does not keep the variables alive.
  """

  owner: Any
  serve: Any

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 (N, 64, 64, 1) -> the signature's outputs as numpy arrays."""
    return {k: v.numpy() for k, v in self.serve(images=tf.constant(images)).items()}


def load_model(model_dir: 'str | os.PathLike[str]') -> LoadedModel:
  """Loads an export with plain TensorFlow and checks its signature; raises ModelDirError."""
  model_dir = os.fspath(model_dir)
  if not os.path.isfile(os.path.join(model_dir, 'saved_model.pb')):
    raise ModelDirError(f'model_dir must be a SavedModel folder (with saved_model.pb). '
                        f'Found none at {model_dir}.')
  try:
    loaded = tf.saved_model.load(model_dir)
  except (OSError, ValueError, tf.errors.OpError) as e:
    raise ModelDirError(f'model_dir must hold a loadable SavedModel. Found {model_dir}, which '
                        f'fails to load: {type(e).__name__}.') from None
  serve = loaded.signatures.get(saved_model.SIGNATURE_KEY)
  if serve is None:
    raise ModelDirError(f'model_dir must have a {saved_model.SIGNATURE_KEY!r} signature. Found '
                        f'{sorted(loaded.signatures)} in {model_dir}.')
  _, inputs = serve.structured_input_signature
  spec = inputs.get(saved_model.INPUT_KEY)
  outputs = set(serve.structured_outputs)
  if (spec is None or spec.dtype != tf.uint8 or spec.shape.as_list() != [None, _SIZE, _SIZE, 1]
      or not outputs >= set(saved_model.OUTPUT_KEYS)):
    raise ModelDirError(f'model_dir must be an export of tff_medical (input images uint8 '
                        f'[None, {_SIZE}, {_SIZE}, 1]; outputs {", ".join(saved_model.OUTPUT_KEYS)}'
                        f'). Found inputs {inputs} and outputs {sorted(outputs)}.')
  return LoadedModel(owner=loaded, serve=serve)


# What the model card says about the training data: a demonstration model trained on synthetic
# phantoms must not be served on real images silently.

_MAX_CARD_BYTES = 1 << 20  # A card is about 15 KB; a larger file is not one.
_MAX_WARNING_CHARS = 500


def training_data_warning(model_dir: 'str | os.PathLike[str]') -> 'str | None':
  """The warning to print once before serving `model_dir`, from its model card; None if none.

  A model whose card says synthetic_training_data (or, in a card written before that field,
  data_source 'phantoms') gets the card's serving_warning: its predictions on real images are
  meaningless. An export without a readable card gets a warning that its data is unknown.
  """
  model_dir = os.fspath(model_dir)
  try:
    with open(os.path.join(model_dir, saved_model.MODEL_CARD_FILENAME), 'rb') as f:
      data = f.read(_MAX_CARD_BYTES + 1)
    card = json.loads(data) if len(data) <= _MAX_CARD_BYTES else None
  except (OSError, ValueError):
    card = None
  if not isinstance(card, dict):
    return (f'{model_dir} has no readable {saved_model.MODEL_CARD_FILENAME}: what this model was '
            'trained on is unknown')
  synthetic = card.get('synthetic_training_data',
                       True if card.get('data_source') == 'phantoms' else None)
  if synthetic is not True:
    return None
  text = card.get('serving_warning')
  # The card's own words, unless they could be anything but one plain line (a crafted card).
  if isinstance(text, str) and text.strip() and text.isprintable() and (
      len(text) <= _MAX_WARNING_CHARS):
    return text.strip()
  return saved_model.SYNTHETIC_SERVING_WARNING


# Reading one file. The pixel pipelines are the loaders' (shared with training); only the choice
# of pipeline is made here.


def _read_dicom(data: bytes, force: bool, limits: limits_lib.InputLimits) -> np.ndarray:
  try:
    return dicom.read_dicom_image(io.BytesIO(data), force=force, limits=limits)
  except dicom.UnusableDicomError as e:
    raise UnreadableImageError(e.reason) from None


def _read_picture(data: bytes, kind: str, limits: limits_lib.InputLimits) -> np.ndarray:
  try:
    image, _ = mednist.decode_image(data, limits)
  except limits_lib.InputRefused as e:
    raise UnreadableImageError(e.reason) from None
  except Exception:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, DecompressionBombError...) for bad files.
    raise UnreadableImageError(f'corrupt or truncated {kind} data') from None
  return image


def read_image(path: str,
               limits: limits_lib.InputLimits = limits_lib.DEFAULT_LIMITS) -> np.ndarray:
  """The (64, 64) uint8 image of one file, as training would see it.

  Raises:
    UnreadableImageError: with the reason the file cannot be used.
  """
  if os.path.isdir(path):
    raise UnreadableImageError('is a folder, not a file')
  try:
    data = limits_lib.read_regular_file(path, limits.max_file_bytes)
  except limits_lib.InputRefused as e:
    if e.reason == limits_lib.REASON_UNREADABLE_FILE:
      # The user named this file: say why it cannot be opened (missing, permissions).
      raise UnreadableImageError(f'cannot open file: {e.detail}') from None
    raise UnreadableImageError(e.reason) from None
  if data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b'DICM':
    return _read_dicom(data, False, limits)
  if data.startswith(_PNG_SIGNATURE):
    return _read_picture(data, 'PNG', limits)
  if data.startswith(_JPEG_SIGNATURE):
    return _read_picture(data, 'JPEG', limits)
  # DICOM without the preamble (older or raw datasets): accepted only if pixels come out, since
  # a forced parse of arbitrary bytes rarely fails outright.
  try:
    return _read_dicom(data, True, limits)
  except UnreadableImageError:
    raise UnreadableImageError(REASON_UNSUPPORTED) from None


def _batches(paths: Sequence[str], size: int) -> Iterator[Sequence[str]]:
  for start in range(0, len(paths), size):
    yield paths[start:start + size]


def predict_files(model: LoadedModel, paths: Iterable[str],
                  batch_size: int = _BATCH_SIZE) -> Iterator[Result]:
  """Classifies `paths` with `model` (from `load_model`); one result per path, in order."""
  paths = [os.fspath(p) for p in paths]
  for chunk in _batches(paths, batch_size):
    images, results = [], []
    for path in chunk:
      try:
        images.append(read_image(path))
        results.append(None)  # Filled from the batch below.
      except UnreadableImageError as e:
        results.append(ReadFailure(path=path, reason=e.reason))
    outputs = None
    if images:
      outputs = model(np.stack(images)[..., np.newaxis])
    row = 0
    for path, result in zip(chunk, results):
      if result is None:
        result = Prediction(
            path=path,
            category_id=outputs['category_id'][row].decode('utf-8'),
            display_name=outputs['display_name'][row].decode('utf-8'),
            privacy_level=outputs['privacy_level'][row].decode('utf-8'),
            probability=float(outputs['probability'][row]))
        row += 1
      yield result


def predict_and_print(model_dir: 'str | os.PathLike[str]', paths: Sequence[str],
                      out: TextIO, err: TextIO) -> int:
  """Prints one line per file (failures to `err`); returns the number of files that failed.

  A model trained on synthetic data (its card says so) first gets one warning line on `err`.

  Raises:
    ModelDirError: `model_dir` is not a usable export.
  """
  model = load_model(model_dir)
  warning = training_data_warning(model_dir)
  if warning is not None:
    print(f'warning: {warning}', file=err, flush=True)  # Once, before any prediction.
  failures = 0
  for result in predict_files(model, paths):
    if isinstance(result, ReadFailure):
      failures += 1
      print(result.line(), file=err, flush=True)
    else:
      print(result.line(), file=out, flush=True)
  return failures
