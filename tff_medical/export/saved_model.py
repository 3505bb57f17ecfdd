"""Exports a trained classifier as a SavedModel that serves with TensorFlow alone, plus its card.

The serving signature and the model card's fields: docs/DESIGN.md.
"""

import datetime
import importlib.metadata
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Optional, Union

import numpy as np
import tensorflow as tf

from tff_medical import categories
from tff_medical import fileio
from tff_medical import run_files
from tff_medical.data import model_input
from tff_medical.data import sources
from tff_medical.errors import TffMedicalError
from tff_medical.monitoring import audit
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy.policy import PrivacyPolicy
from tff_medical.privacy.sampling import SamplingMethod

SIGNATURE_KEY = 'serving_default'
INPUT_KEY = 'images'
OUTPUT_KEYS = ('probabilities', 'category_index', 'category_id', 'display_name',
               'privacy_level', 'probability')
MODEL_CARD_FILENAME = 'model_card.json'
# 2: model-card sections (intended use, training and evaluation data, metrics with intervals,
# limitations), both neighbouring relations in the privacy statement.
MODEL_CARD_SCHEMA_VERSION = 2
_MODEL_CARD_EXTRA_KEYS = frozenset({
    'data_source', 'accuracy_per_category', 'rounds', 'eval_counts_per_category',
    'architecture', 'num_parameters', 'model_version', 'date', 'num_clients',
    'evaluation_data_source'})
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
    # Training's scaling, traced into the graph; the input already has its channel axis.
    inputs = model_input.scale_pixels(images)
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


def _category_mapping(field: str, value: Any) -> Mapping[str, Any]:
  """`value` (None: empty) checked to be a dict keyed by category ids only."""
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise ExportError(f'{field} must be a dict keyed by category id. '
                      f'Found {type(value).__name__}.')
  unknown = [k for k in value if k not in categories.LABEL_OF]
  if unknown:
    raise ExportError(f'{field} keys must be category ids '
                      f'({", ".join(categories.CATEGORY_IDS)}). Found {unknown!r}.')
  return value


def _check_accuracy(accuracy: Any) -> dict[str, Optional[float]]:
  accuracy = _category_mapping('accuracy_per_category', accuracy)
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


# The model card (Mitchell et al., "Model Cards for Model Reporting", FAT* 2019; the sections of
# Google's Model Card Toolkit and Hugging Face model cards): model details, intended use, training
# and evaluation data, metrics with their uncertainty, limitations, and the privacy guarantee.

_CONFIDENCE_LEVEL = 0.95
_MAX_ARCHITECTURE_CHARS = 1000
_MODEL_NAME = 'tff_medical per-category differentially private medical image classifier'
# Known sources are in data.sources; anything else is named as given and treated as real images.
# No example of a misread here: which category a real scan lands in changes from run to run.
_SAMPLE_MISREAD = 'whatever category it names for a real scan, with whatever probability'
SYNTHETIC_SERVING_WARNING = (
    'this model was trained on synthetic phantoms only and has never seen a real medical image; '
    f'its predictions on real images are meaningless ({_SAMPLE_MISREAD}).')
# Ledger schema 1 has no texts of its own; schema 2 states them in neighboring_relations.
_DEFAULT_RELATION_TEXTS = ledger_lib.RELATION_STATEMENTS[SamplingMethod.POISSON]
_RELATIONS = ('remove_category_examples', 'remove_whole_client')


def describe_model(keras_model: tf.keras.Model) -> dict[str, Any]:
  """The card's architecture and num_parameters of a Keras model (pass them to the card)."""
  if not isinstance(keras_model, tf.keras.Model):
    raise ExportError(f'keras_model must be a tf.keras.Model. Found {type(keras_model).__name__}.')
  parts = []
  for layer in keras_model.layers:
    config = layer.get_config()
    name = type(layer).__name__
    if isinstance(layer, tf.keras.layers.Conv2D):
      kernel = 'x'.join(str(k) for k in config['kernel_size'])
      parts.append(f'{name}({config["filters"]}, {kernel}, {config["activation"]})')
    elif isinstance(layer, tf.keras.layers.Dense):
      parts.append(f'{name}({config["units"]}, {config["activation"]})')
    elif 'pool_size' in config:
      parts.append(f'{name}({"x".join(str(k) for k in config["pool_size"])})')
    else:
      parts.append(name)
  return {'architecture': f'{type(keras_model).__name__} CNN: ' + ' > '.join(parts),
          'num_parameters': int(keras_model.count_params())}


def _package_version(name: str) -> Optional[str]:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _short_name(field: str, value: Any) -> Optional[str]:
  if value is None:
    return None
  if (not isinstance(value, str) or not value.strip() or len(value) > _MAX_DATA_SOURCE_CHARS or
      any(c in value for c in '/\\')):
    raise ExportError(f'{field} must be a short name (at most {_MAX_DATA_SOURCE_CHARS} '
                      f'characters, not a path). Found {value!r}.')
  return value.strip()


def _model_details(architecture: Any, num_parameters: Any, model_version: Any, date: Any,
                   rounds: Optional[int], model_sha256: Optional[str]) -> dict[str, Any]:
  if architecture is not None and (not isinstance(architecture, str) or not architecture.strip()
                                   or len(architecture) > _MAX_ARCHITECTURE_CHARS):
    raise ExportError(f'architecture must be a non-empty description of at most '
                      f'{_MAX_ARCHITECTURE_CHARS} characters. Found {architecture!r}.')
  if num_parameters is not None and (isinstance(num_parameters, bool) or
                                     not isinstance(num_parameters, (int, np.integer)) or
                                     num_parameters < 1):
    raise ExportError(f'num_parameters must be a positive integer. Found {num_parameters!r}.')
  model_version = _short_name('model_version', model_version)
  if date is None:
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
  try:
    if not isinstance(date, str):
      raise ValueError(date)
    date = datetime.date.fromisoformat(date).isoformat()
  except ValueError:
    raise ExportError(f'date must be an ISO date such as 2024-05-31. Found {date!r}.') from None
  tff_version = _package_version('tensorflow-federated')
  return {
      'name': _MODEL_NAME,
      'version': model_version or (f'round {rounds}' if rounds is not None else None),
      'date': date,
      'architecture': architecture,
      'num_parameters': None if num_parameters is None else int(num_parameters),
      'framework': (f'TensorFlow {tf.__version__} SavedModel' +
                    (f', trained with TensorFlow Federated {tff_version}' if tff_version else '')),
      'software': f'tff_medical {_package_version("tff_medical") or "(not installed)"}',
      'task': 'classification of 64x64 grayscale medical images into 6 categories',
      'format': 'TensorFlow SavedModel',
      'signature': SIGNATURE_KEY,
      'input': f'{INPUT_KEY}: uint8 [N, {_SIZE}, {_SIZE}, 1], grayscale 0-255',
      'outputs': list(OUTPUT_KEYS),
      # Same hash as the audit log's model_sha256 of the final round.
      'model_sha256': model_sha256,
  }


def _is_synthetic(data_source: Optional[str]) -> Optional[bool]:
  if data_source is None:
    return None  # Not stated: the card cannot say either way.
  known = sources.SOURCES.get(data_source.lower())
  return known is not None and known.generated


def _source_name(data_source: str) -> str:
  known = sources.SOURCES.get(data_source.lower())
  return known.display_name if known is not None and not known.generated else data_source


def _num_clients(num_clients: Any, ledger: Optional[Mapping[str, Any]]) -> Optional[int]:
  if num_clients is not None and (isinstance(num_clients, bool) or
                                  not isinstance(num_clients, (int, np.integer)) or
                                  num_clients < 1):
    raise ExportError(f'num_clients must be a positive integer. Found {num_clients!r}.')
  if ledger is None:
    return None if num_clients is None else int(num_clients)
  # Example level: the sites are the clients; client level: the sampled population.
  from_ledger = (len(ledger['sites']) if 'sites' in ledger else
                 ledger['sampling']['total_clients'])
  if num_clients is not None and num_clients != from_ledger:
    raise ExportError(f'num_clients must equal the ledger\'s number of clients ({from_ledger}). '
                      f'Found {num_clients}.')
  return from_ledger


def _training_data(data_source: Optional[str], num_clients: Optional[int]) -> dict[str, Any]:
  synthetic = _is_synthetic(data_source)
  if synthetic is None:
    description = 'not stated at export'
  elif synthetic:
    description = ('synthetic phantoms generated by tff_medical (tff_medical/data/phantoms.py); '
                   'this model has never seen a real medical image')
  else:
    description = (f'the data custodian\'s {_source_name(data_source)} images, partitioned over '
                   f'{num_clients if num_clients is not None else "an unstated number of"} '
                   'clients; they never left the training process of their client (a site in '
                   'cross-silo)')
  return {
      'source': data_source,
      'synthetic': synthetic,
      'description': description,
      'num_clients': num_clients,
      # The partition manifest and data report hold them; they stay with the custodian.
      'per_client_counts': 'not published (confidential: they are what the guarantee protects)',
  }


def _check_eval_counts(counts: Any) -> dict[str, Optional[int]]:
  counts = _category_mapping('eval_counts_per_category', counts)
  result = {}
  for category_id in categories.CATEGORY_IDS:
    value = counts.get(category_id)
    if value is not None and (isinstance(value, bool) or
                              not isinstance(value, (int, np.integer)) or value < 0):
      raise ExportError(f'eval_counts_per_category.{category_id} must be a non-negative integer. '
                        f'Found {value!r}.')
    result[category_id] = None if value is None else int(value)
  return result


def wilson_interval(correct: int, total: int,
                    confidence_level: float = _CONFIDENCE_LEVEL) -> tuple[float, float]:
  """The Wilson score interval of a binomial proportion correct / total."""
  # statsmodels' proportion_confint(method='wilson') is the usual call, but statsmodels is not
  # a dependency (not in the venv); scipy (pinned) computes the same interval.
  from scipy import stats  # pylint: disable=g-import-not-at-top
  interval = stats.binomtest(int(correct), int(total)).proportion_ci(
      confidence_level=confidence_level, method='wilson')
  return float(interval.low), float(interval.high)


def _metrics(accuracy: Mapping[str, Optional[float]], counts: Mapping[str, Optional[int]],
             policy: PrivacyPolicy) -> dict[str, Any]:
  per_category = {}
  for budget in policy.budgets:
    c, value, n = budget.id, accuracy[budget.id], counts[budget.id]
    correct = interval = None
    if value is None:
      if n:
        raise ExportError(f'accuracy_per_category.{c} must be given with '
                          f'eval_counts_per_category.{c} = {n}. Found None.')
    elif n is not None:
      correct = round(value * n)
      if n == 0 or not math.isclose(correct / n, value, rel_tol=0, abs_tol=1e-9):
        raise ExportError(f'accuracy_per_category.{c} must be a count of correct images over '
                          f'eval_counts_per_category.{c} ({n}). Found {value!r}.')
      interval = list(wilson_interval(correct, n))
    per_category[c] = {
        'display_name': budget.display_name,
        'accuracy': value,
        'test_images': n,
        'correct': correct,
        # None: not measured, or the test count was not supplied at export.
        'ci95': interval,
    }
  return {
      'metric': ('accuracy per true category: the share of that category\'s test images that '
                 'the model assigns to it'),
      'uncertainty': (f'{_CONFIDENCE_LEVEL:.0%} Wilson score interval of a binomial proportion '
                      '(sampling uncertainty of the test split only)'),
      'confidence_level': _CONFIDENCE_LEVEL,
      'covered_by_privacy_guarantee': False,
      'per_category': per_category,
  }


def _evaluation_data(source: Optional[str], measured: bool) -> dict[str, Any]:
  synthetic = _is_synthetic(source)
  if not measured:
    description = 'none: no test-split evaluation was supplied at export'
  elif synthetic:
    description = ('a held-out test split of synthetic phantoms, from a generator stream never '
                   'used in training')
  elif synthetic is None:
    description = 'a held-out test split of data not stated at export, never used in training'
  else:
    description = (f'the data custodian\'s held-out test split of {_source_name(source)} images, '
                   'never used in training')
  images = 'synthetic' if synthetic else 'real'
  return {
      'source': source,
      'description': description,
      'covered_by_privacy_guarantee': False,
      'privacy': ('The evaluation metrics are NOT covered by the differential-privacy guarantee: '
                  f'they are computed on held-out {images} images and released as is (exact '
                  'accuracy and test-image count per category, no noise).'),
  }


def _limitations(synthetic: Optional[bool], policy: PrivacyPolicy) -> list[str]:
  names = ', '.join(b.display_name for b in policy.budgets)
  found = []
  if synthetic:
    found.append('Trained on synthetic phantoms generated by tff_medical only: this model has '
                 'never seen a real medical image. It is a demonstration model; its predictions '
                 f'on real images are meaningless ({_SAMPLE_MISREAD}).')
  elif synthetic is None:
    found.append('The training data was not stated at export: what the model has seen is '
                 'unknown.')
  found += [
      f'The category set is fixed to the six MedNIST classes ({names}). Every input is forced '
      'into one of them: an image of anything else (another body part or modality, a '
      'non-medical picture) still gets one of these labels and a probability, which is not a '
      'calibrated confidence.',
      f'Input is one {_SIZE}x{_SIZE} grayscale image (uint8 0-255); larger or color images are '
      'resized and converted to grayscale before classification, losing detail.',
      'Accuracy is measured on one held-out test split; the intervals show its sampling '
      'uncertainty only. Performance on other populations, scanners or sites is unknown: there '
      'is no external validation.',
      'Differential-privacy noise lowers accuracy, most for the categories with the smallest '
      'epsilon (High privacy).',
      'Floating-point noise: the Gaussian noise is float32 from a PRNG seeded from OS entropy; '
      'there is no discrete Gaussian, so the privacy figures are those of the ideal mechanism '
      '(privacy.floating_point_noise).',
      'The privacy figures hold for what is published only: releasing a confidential run file '
      '(participants of each round, partition manifest, checkpoints) voids them '
      '(privacy.not_published).',
      'Not a medical device: not validated clinically and not cleared by any regulator.',
  ]
  return found


def _intended_use(synthetic: Optional[bool]) -> dict[str, Any]:
  out_of_scope = [
      'clinical diagnosis, triage, screening or any other decision about a patient',
      'labelling or routing real medical images without review by a qualified person',
  ]
  if synthetic:
    out_of_scope.append('any use on real images: the model is a demonstration trained on '
                        'synthetic phantoms only')
  return {
      'primary_uses': ['research on federated learning with per-category differential privacy',
                       'demonstration of the tff_medical pipeline (training, privacy accounting, '
                       'export, serving)'],
      'primary_users': ['researchers and engineers evaluating privacy-preserving federated '
                        'learning'],
      'out_of_scope_uses': out_of_scope,
  }


_FLOATING_POINT_NOISE = {
    'implementation': (
        'The Gaussian noise is float32, drawn by TensorFlow\'s Philox-based random ops (TF '
        'Privacy\'s GaussianSumQuery at client level, tf.random.Generator in example-level '
        'DP-SGD) seeded from OS entropy, and added to the float32 aggregate. There is no '
        'discrete Gaussian.'),
    'known_attack': (
        'Floating-point attacks on DP noise (Mironov, "On Significance of the Least Significant '
        'Bits for Differential Privacy", CCS 2012, for Laplace; Jin et al., IEEE S&P 2022, for '
        'Gaussian samplers) read the secret through the low-order bits of a floating-point '
        'noised value. The epsilons above are those of the ideal real-valued mechanism.'),
    'mitigation': (
        'Here: the noise seed is never public, and what is released is the model after the '
        'server optimizer\'s further floating-point step, not the raw noised sum; this blurs '
        'the low-order bits but is no proof. Secure deployments should use a discrete Gaussian '
        'with secure aggregation (Canonne, Kamath and Steinke 2020; Kairouz, Liu and Steinke '
        '2021; TFF\'s DistributedDpSumFactory).'),
}


def _relation_texts(ledger: Mapping[str, Any]) -> dict[str, str]:
  return dict(_DEFAULT_RELATION_TEXTS, **(ledger.get('neighboring_relations') or {}))


def _inline(text: str) -> str:
  # The ledger's texts may hold a '; ' of their own; inside one sentence it would split (a).
  return text.replace('; ', ', ')


def _for_category(text: str, display_name: str) -> str:
  return _inline(text).replace('category-c', display_name).replace('category c', display_name)


def _client_category_statement(entry: Mapping[str, Any], ledger: Mapping[str, Any],
                               texts: Mapping[str, str]) -> str:
  name, delta = entry['display_name'], ledger['delta']
  a, b = (_for_category(texts[r], name) for r in _RELATIONS)
  sampling = ledger['sampling']
  how = (f'{ledger["accountant"]} accountant, {sampling["method"]} sampling of clients '
         f'(rate {sampling["rate"]:.4g}), {entry["rounds_released"]} released rounds; target '
         f'epsilon {entry["target_epsilon"]:g}')
  relations = entry.get('relations')
  if relations:
    ea, eb = (relations[r]['epsilon'] for r in _RELATIONS)
    text = (f'{name} ({entry["privacy_level"]} privacy): everything released is '
            f'({entry["epsilon_spent"]:.4g}, {delta:g})-differentially private with respect to '
            f'both (a) {a} (epsilon {ea:.4g}), and (b) {b} (epsilon {eb:.4g}); {how}.')
  else:
    text = (f'{name} ({entry["privacy_level"]} privacy): everything released is '
            f'({entry["epsilon_spent"]:.4g}, {delta:g})-differentially private with respect to '
            f'(a) {a}; {how}. Relation (b), {b}, is not accounted in this ledger (schema '
            f'version {ledger["schema_version"]}): under it the other categories\' clipped '
            'counts move too, and its epsilon can be slightly larger.')
  earlier = ledger.get('earlier_runs') or []
  if earlier and 'epsilon_this_run' in entry:
    text += (f' The figure composes this run with {len(earlier)} earlier run(s) on the same '
             f'data; this run alone: {entry["epsilon_this_run"]:.4g}.')
  return text


def _release_boundary() -> dict[str, Any]:
  return {
      'published': sorted(run_files.PUBLISHABLE | {run_files.PUBLIC_DASHBOARD_FILE}),
      'not_published': dict(sorted(run_files.CONFIDENTIAL_REASONS.items())),
  }


def _privacy_section(ledger: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  if ledger is None:
    return {'guarantee': 'none claimed: no privacy ledger was supplied at export',
            'floating_point_noise': dict(_FLOATING_POINT_NOISE), **_release_boundary()}
  example_level = ledger['privacy_unit'] == 'example'
  texts = _relation_texts(ledger)
  per_category = {}
  for category_id, entry in ledger['categories'].items():
    relations = entry.get('relations')
    if example_level:
      statement = (
          f'{entry["display_name"]} ({entry["privacy_level"]} privacy): '
          f'({entry["epsilon_spent"]:.4g}, {ledger["delta"]:g})-differential privacy with '
          f'respect to adding or removing one {entry["display_name"]} image at one site (the '
          f'worst site\'s figure), {ledger["accountant"]} accountant, over '
          f'{entry["rounds_released"]} released rounds; target epsilon '
          f'{entry["target_epsilon"]:g}.')
    else:
      statement = _client_category_statement(entry, ledger, texts)
    per_category[category_id] = {
        'display_name': entry['display_name'],
        'privacy_level': entry['privacy_level'],
        'target_epsilon': entry['target_epsilon'],
        'epsilon_spent': entry['epsilon_spent'],
        # Per relation, copied from the ledger (schema 2); None: one relation accounted.
        'epsilon_by_relation': ({r: relations[r]['epsilon'] for r in _RELATIONS}
                                if relations else None),
        'epsilon_this_run': entry.get('epsilon_this_run', entry['epsilon_spent']),
        'delta': ledger['delta'],
        'noise_multiplier': entry['noise_multiplier'],
        'rounds_released': entry['rounds_released'],
        'status': entry['status'],
        'accountant': ledger['accountant'],
        'privacy_unit': ledger['privacy_unit'],
        'neighboring_relation': ledger['neighboring_relation'],
        'client_level_epsilon': ledger['client_level_epsilon'],
        'statement': statement,
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
      'earlier_runs_on_same_data': len(ledger.get('earlier_runs') or []),
      'categories': per_category,
  }
  if example_level:
    # Per site figures stay in the ledger; the card carries the whole's (the worst site's).
    section.update({k: ledger[k] for k in ('whole_guarantee', 'statement',
                                           'example_level_epsilon') if k in ledger})
    section['privacy_unit_description'] = 'one image (example) at one site'
  else:
    both = all(e.get('relations') for e in ledger['categories'].values())
    section['privacy_unit_description'] = (
        'one client: in simulation a patient or a small clinic, in cross-silo a site')
    section['relations'] = {r: texts[r] for r in _RELATIONS}
    section['statement'] = (
        'Per category c, with epsilon_c and delta below: everything released is '
        '(epsilon_c, delta)-differentially private with respect to (a) ' +
        _inline(texts['remove_category_examples']) + ', and (b) ' +
        _inline(texts['remove_whole_client']) +
        ('; epsilon_c is the larger of the two.' if both else
         '; this ledger accounts (a) only.') +
        f' A client holding images of several categories: ({ledger["client_level_epsilon"]:.4g}, '
        f'{ledger["delta"]:g})-differential privacy with respect to {texts["client_level"]}, all '
        'categories composed (client_level_epsilon). The guarantee assumes that which clients '
        'took part in each round stays secret, and covers the published files only; evaluation '
        'metrics are not covered (evaluation_data).')
  section['floating_point_noise'] = dict(_FLOATING_POINT_NOISE)
  section.update(_release_boundary())
  return section


def build_model_card(policy: PrivacyPolicy,
                     ledger_json: LedgerArg = None,
                     *,
                     data_source: Optional[str] = None,
                     accuracy_per_category: Optional[Mapping[str, float]] = None,
                     rounds: Optional[int] = None,
                     model_sha256: Optional[str] = None,
                     eval_counts_per_category: Optional[Mapping[str, int]] = None,
                     architecture: Optional[str] = None,
                     num_parameters: Optional[int] = None,
                     model_version: Optional[str] = None,
                     date: Optional[str] = None,
                     num_clients: Optional[int] = None,
                     evaluation_data_source: Optional[str] = None) -> dict[str, Any]:
  """The model card as a dict; see `write_model_card`."""
  policy = _check_policy(policy)
  ledger = load_ledger_json(ledger_json)
  if ledger is not None:
    _check_ledger_matches_policy(ledger, policy)
  if model_sha256 is not None and (not isinstance(model_sha256, str) or
                                   not re.fullmatch(r'[0-9a-f]{64}', model_sha256)):
    raise ExportError(f'model_sha256 must be 64 hex digits. Found {model_sha256!r}.')
  data_source = _check_data_source(data_source)
  evaluation_source = (_short_name('evaluation_data_source', evaluation_data_source)
                       if evaluation_data_source is not None else data_source)
  rounds = _check_rounds(rounds, ledger)
  accuracy = _check_accuracy(accuracy_per_category)
  metrics = _metrics(accuracy, _check_eval_counts(eval_counts_per_category), policy)
  synthetic = _is_synthetic(data_source)
  return {
      'schema_version': MODEL_CARD_SCHEMA_VERSION,
      'model_details': _model_details(architecture, num_parameters, model_version, date, rounds,
                                      model_sha256),
      'intended_use': _intended_use(synthetic),
      # predict.py reads these two to warn when it serves a demonstration model.
      'synthetic_training_data': synthetic,
      'demonstration_only': synthetic,
      'serving_warning': SYNTHETIC_SERVING_WARNING if synthetic else None,
      'training_data': _training_data(data_source, _num_clients(num_clients, ledger)),
      'evaluation_data': _evaluation_data(
          evaluation_source, any(v is not None for v in accuracy.values())),
      'categories': [{
          'index': index,
          'id': b.id,
          'display_name': b.display_name,
          'privacy_level': b.privacy_level.value,
      } for index, b in enumerate(policy.budgets)],
      'data_source': data_source,
      'rounds': rounds,
      'accuracy_per_category': accuracy,
      'metrics': metrics,
      'limitations': _limitations(synthetic, policy),
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
                     **card_fields: Any) -> dict[str, Any]:
  """Writes model_card.json: model details, intended use, data, metrics, limitations, privacy.

  Args:
    path: the card's file path, or a folder (the run folder) to write model_card.json into.
    policy: the privacy policy the model was trained under (names and levels of categories).
    ledger_json: the run's published privacy ledger (privacy_ledger.json contents or its path);
      each category's guarantee (target and spent epsilon, delta, noise multiplier, accountant,
      privacy unit, client-level epsilon) is copied from it. None: the card claims no guarantee.
    **card_fields: `build_model_card`'s keyword arguments, which are:
    data_source: a short name of the training data: config.dataset ('phantoms' marks the card
      synthetic_training_data and demonstration_only; 'mednist', 'dicom'), not a path.
      None: the card says the training data was not stated.
    accuracy_per_category: category id -> test accuracy in [0, 1]; missing ones are null.
    rounds: training rounds; defaults to the ledger's rounds_completed and must agree with it.
    model_sha256: `audit.model_weights_sha256` of the final weights, linking card and audit log.
    eval_counts_per_category: category id -> number of test images (the confusion matrix's row
      sums); with it each accuracy gets its 95% Wilson interval, and it must make the accuracy a
      whole number of correct images.
    architecture, num_parameters: the model's (`describe_model(keras_model)`).
    model_version: a short name of this version; default 'round <rounds>'.
    date: ISO date of the model; default today (UTC).
    num_clients: clients the training data was partitioned over; default (and must agree with)
      the ledger's.
    evaluation_data_source: the test split's source when not data_source's (cross-silo).

  Returns:
    The card as written.

  Raises:
    ExportError / PolicyError (TffMedicalError): invalid input, or a ledger that does not match
      the policy.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, MODEL_CARD_FILENAME)
  card = build_model_card(policy, ledger_json, **card_fields)
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
    model_card_extra: more card fields (see `write_model_card`): data_source,
      accuracy_per_category, eval_counts_per_category, rounds, model_version, date,
      num_clients, evaluation_data_source; architecture and num_parameters default to
      `describe_model(keras_model)`.

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
  for key, value in describe_model(keras_model).items():
    extra.setdefault(key, value)
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
