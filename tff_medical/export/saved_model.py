"""Exports a trained classifier as a SavedModel that serves with TensorFlow alone, plus its card.

The SavedModel has one signature, 'serving_default':
  input   images: uint8 [N, 64, 64, 1], grayscale 0-255 (what the data loaders produce);
  outputs probabilities float32 [N, 6], category_index int32 [N], category_id string [N],
          display_name string [N], privacy_level string [N], probability float32 [N] (the max).
Scaling to [0, 1] happens inside, as in training (data/client_data.py), so a caller cannot get it
wrong. Category ids, display names and privacy levels are string constants in the graph, taken
from the policy: loading needs no tff_medical import and no Keras custom objects.

The model card (model_card.json) states what the model is, where its data came from, its
accuracy per category and, copied from the privacy ledger, the differential-privacy guarantee of
each category. It holds no patient identifier: only policy, ledger, accuracy figures and a short
data-source name (refused if it looks like a path, which could name a patient or a site).
"""

import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Optional, Union

import numpy as np
import tensorflow as tf

from tff_medical import fileio
from tff_medical import categories
from tff_medical.errors import TffMedicalError
from tff_medical.monitoring import audit
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy.policy import PrivacyPolicy

SIGNATURE_KEY = 'serving_default'
INPUT_KEY = 'images'
OUTPUT_KEYS = ('probabilities', 'category_index', 'category_id', 'display_name',
               'privacy_level', 'probability')
MODEL_CARD_FILENAME = 'model_card.json'
MODEL_CARD_SCHEMA_VERSION = 1
_MODEL_CARD_EXTRA_KEYS = frozenset({'data_source', 'accuracy_per_category', 'rounds'})
_MAX_DATA_SOURCE_CHARS = 100
_SIZE = categories.IMAGE_SIZE

LedgerArg = Optional[Union[Mapping[str, Any], str, 'os.PathLike[str]']]


class ExportError(TffMedicalError):
  """A model, export folder or model-card input that cannot be exported."""


class _Serving(tf.Module):
  """The exported object: the model and a signature that takes raw uint8 images."""

  def __init__(self, keras_model: tf.keras.Model, policy: PrivacyPolicy):
    super().__init__(name='tff_medical_classifier')
    self.model = keras_model  # Tracked, so its variables are saved.
    # Python strings, not tensors: they become graph constants when `serve` is traced.
    self._category_ids = tuple(b.id for b in policy.budgets)
    self._display_names = tuple(b.display_name for b in policy.budgets)
    self._privacy_levels = tuple(b.privacy_level.value for b in policy.budgets)

  @tf.function(input_signature=[
      tf.TensorSpec([None, _SIZE, _SIZE, 1], tf.uint8, name=INPUT_KEY)])
  def serve(self, images):
    # Same scaling as training's input pipeline (client_data._to_model_input).
    inputs = tf.cast(images, tf.float32) / 255.0
    # An empty batch skips the model: TF 2.14's graph Conv2D fails on zero images.
    probabilities = tf.cond(
        tf.shape(images)[0] > 0,
        lambda: tf.cast(self.model(inputs, training=False), tf.float32),
        lambda: tf.zeros([0, categories.NUM_CATEGORIES], tf.float32))
    index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    return {
        'probabilities': probabilities,
        'category_index': index,
        'category_id': tf.gather(tf.constant(self._category_ids), index),
        'display_name': tf.gather(tf.constant(self._display_names), index),
        'privacy_level': tf.gather(tf.constant(self._privacy_levels), index),
        'probability': tf.reduce_max(probabilities, axis=-1),
    }


def _check_policy(policy: Any) -> PrivacyPolicy:
  if not isinstance(policy, PrivacyPolicy):
    raise ExportError(f'policy must be a PrivacyPolicy. Found {type(policy).__name__}.')
  if tuple(b.id for b in policy.budgets) != categories.CATEGORY_IDS:
    # The label index is the position: a reordered policy would mislabel every prediction.
    raise ExportError(f'policy categories must be {", ".join(categories.CATEGORY_IDS)} in that '
                      f'order. Found {", ".join(b.id for b in policy.budgets)}.')
  return policy


def _check_model(keras_model: Any) -> tf.keras.Model:
  if not isinstance(keras_model, tf.keras.Model):
    raise ExportError(f'keras_model must be a tf.keras.Model. Found {type(keras_model).__name__}.')
  expected_in = (None, _SIZE, _SIZE, 1)
  expected_out = (None, categories.NUM_CATEGORIES)
  try:
    shapes = (tuple(keras_model.input_shape), tuple(keras_model.output_shape))
  except (AttributeError, ValueError, TypeError):
    shapes = None  # A subclassed model that was never built has no shapes.
  if shapes != (expected_in, expected_out):
    raise ExportError(f'keras_model must map {expected_in} to {expected_out}. Found {shapes}.')
  # The signature reports probabilities: logits would give meaningless 'probability' values.
  sums = keras_model(np.zeros((1,) + expected_in[1:], np.float32), training=False).numpy().sum(-1)
  if not np.allclose(sums, 1.0, atol=1e-4):
    raise ExportError(f'keras_model must end in a softmax (outputs summing to 1). Found sum '
                      f'{float(sums[0]):.4f}.')
  return keras_model


def load_ledger_json(ledger_json: LedgerArg) -> Optional[dict[str, Any]]:
  """A published ledger from a dict or a privacy_ledger.json path, validated; None passes."""
  if ledger_json is None:
    return None
  if isinstance(ledger_json, (str, os.PathLike)):
    path = os.fspath(ledger_json)
    try:
      with open(path, encoding='utf-8') as f:
        ledger_json = json.load(f)
    except OSError as e:
      raise ExportError(f'privacy ledger must be readable. Found {path}: {e.strerror}.') from None
    except ValueError as e:
      raise ExportError(f'privacy ledger must be valid JSON. Found an error in {path}: {e}.'
                       ) from None
  if not isinstance(ledger_json, Mapping):
    raise ExportError(f'ledger_json must be a dict or a path. Found {type(ledger_json).__name__}.')
  ledger_lib.validate_ledger_json(ledger_json)  # PolicyError names every problem.
  return json.loads(json.dumps(ledger_json))  # A plain copy: the card never aliases the caller's.


def _check_ledger_matches_policy(ledger: Mapping[str, Any], policy: PrivacyPolicy) -> None:
  """The card must describe the policy baked into the model, not another run's."""
  if not math.isclose(ledger['delta'], policy.delta, rel_tol=1e-9):
    raise ExportError(f'ledger delta must equal the policy delta ({policy.delta!r}). '
                      f'Found {ledger["delta"]!r}.')
  for budget in policy.budgets:
    entry = ledger['categories'][budget.id]
    expected = {'display_name': budget.display_name,
                'privacy_level': budget.privacy_level.value,
                'target_epsilon': budget.epsilon}
    for key, value in expected.items():
      same = (math.isclose(entry[key], value, rel_tol=1e-9) if key == 'target_epsilon'
              else entry[key] == value)
      if not same:
        raise ExportError(f'ledger categories.{budget.id}.{key} must equal the policy '
                          f'({value!r}). Found {entry[key]!r}.')


def _check_data_source(data_source: Any) -> Optional[str]:
  if data_source is None:
    return None
  if (not isinstance(data_source, str) or not data_source.strip() or
      len(data_source) > _MAX_DATA_SOURCE_CHARS or any(c in data_source for c in '/\\')):
    raise ExportError(f'data_source must be a short name such as "MedNIST" (at most '
                      f'{_MAX_DATA_SOURCE_CHARS} characters, not a path). Found {data_source!r}.')
  return data_source.strip()


def _check_accuracy(accuracy: Any) -> dict[str, Optional[float]]:
  if accuracy is None:
    accuracy = {}
  if not isinstance(accuracy, Mapping):
    raise ExportError(f'accuracy_per_category must be a dict keyed by category id. '
                      f'Found {type(accuracy).__name__}.')
  unknown = [k for k in accuracy if k not in categories.LABEL_OF]
  if unknown:
    raise ExportError(f'accuracy_per_category keys must be category ids '
                      f'({", ".join(categories.CATEGORY_IDS)}). Found {unknown!r}.')
  result = {}
  for category_id in categories.CATEGORY_IDS:
    value = accuracy.get(category_id)
    if value is not None:
      if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or
          not 0.0 <= float(value) <= 1.0):
        raise ExportError(f'accuracy_per_category.{category_id} must be a number in [0, 1]. '
                          f'Found {value!r}.')
      value = float(value)
    result[category_id] = value  # None: not measured (e.g. no test images of that category).
  return result


def _check_rounds(rounds: Any, ledger: Optional[Mapping[str, Any]]) -> Optional[int]:
  if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or
                             rounds < 0):
    raise ExportError(f'rounds must be a non-negative integer. Found {rounds!r}.')
  if ledger is None:
    return rounds
  if rounds is not None and rounds != ledger['rounds_completed']:
    raise ExportError(f'rounds must equal the ledger rounds_completed '
                      f'({ledger["rounds_completed"]}). Found {rounds}.')
  return ledger['rounds_completed']


def _privacy_section(ledger: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  if ledger is None:
    return {'guarantee': 'none claimed: no privacy ledger was supplied at export'}
  per_category = {}
  for category_id, entry in ledger['categories'].items():
    per_category[category_id] = {
        'display_name': entry['display_name'],
        'privacy_level': entry['privacy_level'],
        'target_epsilon': entry['target_epsilon'],
        'epsilon_spent': entry['epsilon_spent'],
        'delta': ledger['delta'],
        'noise_multiplier': entry['noise_multiplier'],
        'rounds_released': entry['rounds_released'],
        'status': entry['status'],
        'accountant': ledger['accountant'],
        'privacy_unit': ledger['privacy_unit'],
        'neighboring_relation': ledger['neighboring_relation'],
        'client_level_epsilon': ledger['client_level_epsilon'],
        'statement': (
            f'{entry["display_name"]} ({entry["privacy_level"]} privacy): '
            f'({entry["epsilon_spent"]:.4g}, {ledger["delta"]:g})-differential privacy per '
            f'{ledger["privacy_unit"]} ({ledger["neighboring_relation"]}), '
            f'{ledger["accountant"]} accountant, over {entry["rounds_released"]} released '
            f'rounds; target epsilon {entry["target_epsilon"]:g}.'),
    }
  section = {
      'guarantee': f'{ledger["privacy_unit"]}-level differential privacy, per category',
      'accountant': ledger['accountant'],
      'privacy_unit': ledger['privacy_unit'],
      'neighboring_relation': ledger['neighboring_relation'],
      'delta': ledger['delta'],
      'client_level_epsilon': ledger['client_level_epsilon'],
      'sampling': ledger['sampling'],
      'rounds_completed': ledger['rounds_completed'],
      'categories': per_category,
  }
  if ledger['privacy_unit'] == 'example':
    # Per site figures stay in the ledger; the card carries the whole's (the worst site's).
    section.update({k: ledger[k] for k in ('whole_guarantee', 'statement',
                                           'example_level_epsilon') if k in ledger})
  return section


def build_model_card(policy: PrivacyPolicy,
                     ledger_json: LedgerArg = None,
                     *,
                     data_source: Optional[str] = None,
                     accuracy_per_category: Optional[Mapping[str, float]] = None,
                     rounds: Optional[int] = None,
                     model_sha256: Optional[str] = None) -> dict[str, Any]:
  """The model card as a dict; see `write_model_card`."""
  policy = _check_policy(policy)
  ledger = load_ledger_json(ledger_json)
  if ledger is not None:
    _check_ledger_matches_policy(ledger, policy)
  if model_sha256 is not None and (not isinstance(model_sha256, str) or
                                   not re.fullmatch(r'[0-9a-f]{64}', model_sha256)):
    raise ExportError(f'model_sha256 must be 64 hex digits. Found {model_sha256!r}.')
  return {
      'schema_version': MODEL_CARD_SCHEMA_VERSION,
      'model': {
          'task': 'classification of 64x64 grayscale medical images into 6 categories',
          'format': 'TensorFlow SavedModel',
          'signature': SIGNATURE_KEY,
          'input': f'{INPUT_KEY}: uint8 [N, {_SIZE}, {_SIZE}, 1], grayscale 0-255',
          'outputs': list(OUTPUT_KEYS),
          # Same hash as the audit log's model_sha256 of the final round.
          'model_sha256': model_sha256,
      },
      'categories': [{
          'index': index,
          'id': b.id,
          'display_name': b.display_name,
          'privacy_level': b.privacy_level.value,
      } for index, b in enumerate(policy.budgets)],
      'data_source': _check_data_source(data_source),
      'rounds': _check_rounds(rounds, ledger),
      'accuracy_per_category': _check_accuracy(accuracy_per_category),
      'privacy': _privacy_section(ledger),
  }


def _umask_mode(mode: int) -> int:
  # mkstemp/mkdtemp create private files; the result should have the usual permissions.
  umask = os.umask(0)
  os.umask(umask)
  return mode & ~umask


def _write_json_atomically(path: str, payload: Mapping[str, Any]) -> None:
  fileio.write_atomic(path, json.dumps(payload, indent=2, allow_nan=False) + '\n')


def write_model_card(path: 'str | os.PathLike[str]',
                     policy: PrivacyPolicy,
                     ledger_json: LedgerArg = None,
                     *,
                     data_source: Optional[str] = None,
                     accuracy_per_category: Optional[Mapping[str, float]] = None,
                     rounds: Optional[int] = None,
                     model_sha256: Optional[str] = None) -> dict[str, Any]:
  """Writes model_card.json: what the model is, its data source, accuracy and privacy guarantee.

  Args:
    path: the card's file path, or a folder (the run folder) to write model_card.json into.
    policy: the privacy policy the model was trained under (names and levels of categories).
    ledger_json: the run's published privacy ledger (privacy_ledger.json contents or its path);
      each category's guarantee (target and spent epsilon, delta, noise multiplier, accountant,
      privacy unit, client-level epsilon) is copied from it. None: the card claims no guarantee.
    data_source: a short name of the training data, e.g. 'MedNIST'; not a path.
    accuracy_per_category: category id -> test accuracy in [0, 1]; missing ones are null.
    rounds: training rounds; defaults to the ledger's rounds_completed and must agree with it.
    model_sha256: `audit.model_weights_sha256` of the final weights, linking card and audit log.

  Returns:
    The card as written.

  Raises:
    ExportError / PolicyError (TffMedicalError): invalid input, or a ledger that does not match
      the policy.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, MODEL_CARD_FILENAME)
  card = build_model_card(policy, ledger_json, data_source=data_source,
                          accuracy_per_category=accuracy_per_category, rounds=rounds,
                          model_sha256=model_sha256)
  _write_json_atomically(path, card)
  return card


def export_saved_model(keras_model: tf.keras.Model,
                       export_dir: 'str | os.PathLike[str]',
                       policy: PrivacyPolicy,
                       ledger_json: LedgerArg = None,
                       model_card_extra: Optional[Mapping[str, Any]] = None) -> str:
  """Exports `keras_model` as a SavedModel with its model card inside (model_card.json).

  Args:
    keras_model: a classifier from float32 [N, 64, 64, 1] in [0, 1] to 6 softmax probabilities
      in `categories.CATEGORY_IDS` order (models.cnn.build_cnn).
    export_dir: the folder to create; it must not exist or be empty (an export is never mixed
      with an older one). Written beside it first and renamed into place when complete.
    policy: the privacy policy; its display names and privacy levels become the served strings.
    ledger_json: the run's privacy ledger (dict or path), copied into the model card.
    model_card_extra: more card fields: data_source, accuracy_per_category, rounds (see
      `write_model_card`).

  Returns:
    The export folder.

  Raises:
    ExportError / PolicyError (TffMedicalError): a model of the wrong shape or without softmax,
      a non-empty export_dir, or invalid card input. Nothing is written then.
  """
  policy = _check_policy(policy)
  keras_model = _check_model(keras_model)
  extra = dict(model_card_extra or {})
  unknown = sorted(set(extra) - _MODEL_CARD_EXTRA_KEYS)
  if unknown:
    raise ExportError(f'model_card_extra keys must be among '
                      f'{", ".join(sorted(_MODEL_CARD_EXTRA_KEYS))}. Found {unknown}.')
  # The whole card is checked before anything is written.
  card = build_model_card(policy, ledger_json,
                          model_sha256=audit.model_weights_sha256(keras_model.get_weights()),
                          **extra)

  export_dir = os.path.abspath(os.fspath(export_dir))
  if os.path.exists(export_dir) and (not os.path.isdir(export_dir) or os.listdir(export_dir)):
    raise ExportError(f'export_dir must not exist or be empty. Found {export_dir} with content.')
  parent = os.path.dirname(export_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(export_dir)}.')
  try:
    module = _Serving(keras_model, policy)
    tf.saved_model.save(module, staging,
                        signatures={SIGNATURE_KEY: module.serve.get_concrete_function()})
    _write_json_atomically(os.path.join(staging, MODEL_CARD_FILENAME), card)
    os.chmod(staging, _umask_mode(0o777))
    if os.path.isdir(export_dir):
      os.rmdir(export_dir)  # Empty (checked above); os.replace needs it gone or empty.
    os.replace(staging, export_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return export_dir
