"""Centralized, non-private training: the ceiling the federated, private runs are measured from.

Imports TensorFlow only; never TensorFlow Federated, so that baselines start in seconds.
"""

import dataclasses
import math
import numbers
import time
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf

from tff_medical import categories
from tff_medical.data import model_input
from tff_medical.data import phantoms
from tff_medical.data import source
from tff_medical.errors import ConfigError
from tff_medical.models import cnn


@dataclasses.dataclass(frozen=True)
class CentralizedResult:
  """Test accuracy overall and per category, with what produced it."""

  accuracy: float
  per_category_accuracy: dict[str, float]  # NaN for a category without test images.
  confusion: np.ndarray  # confusion[true label, predicted label], counts.
  num_train: int
  num_test: int
  epochs: int
  batch_size: int
  learning_rate: float
  seed: int
  train_seconds: float

  def to_json_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), confusion=self.confusion.tolist())

  def summary(self) -> str:
    lines = [f'test accuracy: {self.accuracy:.4f} ({self.num_test} test images, '
             f'{self.num_train} training images, {self.epochs} epochs, '
             f'{self.train_seconds:.1f} s training)']
    for category_id, accuracy in self.per_category_accuracy.items():
      lines.append(f'  {categories.DISPLAY_NAMES[category_id]:<12} {accuracy:.4f}')
    return '\n'.join(lines)


def to_model_inputs(images: np.ndarray) -> np.ndarray:
  """uint8 (N, 64, 64) to the CNN's input: float32 (N, 64, 64, 1) in [0, 1]."""
  return model_input.to_model_input(images)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
  size = categories.NUM_CATEGORIES
  return np.bincount(labels * size + predictions, minlength=size * size).reshape(size, size)


def per_category_accuracy(confusion: np.ndarray) -> dict[str, float]:
  totals = confusion.sum(axis=1)
  return {
      category_id: float(confusion[i, i] / totals[i]) if totals[i] else math.nan
      for i, category_id in enumerate(categories.CATEGORY_IDS)
  }


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ConfigError(f'{name} must be a positive integer. Found {value!r}.')
  return int(value)


def train_centralized(train: source.LabeledImages, test: source.LabeledImages, *,
                      epochs: int = 5, batch_size: int = 32, learning_rate: float = 3e-3,
                      seed: int = 0, model_kwargs: Optional[Mapping[str, Any]] = None
                      ) -> CentralizedResult:
  """Trains cnn.build_cnn(**model_kwargs) with Adam on `train` and evaluates it on `test`."""
  epochs = _positive_int('epochs', epochs)
  batch_size = _positive_int('batch_size', batch_size)
  if not (isinstance(learning_rate, numbers.Real) and math.isfinite(learning_rate) and
          learning_rate > 0):
    raise ConfigError(f'learning_rate must be positive. Found {learning_rate!r}.')
  if not len(train) or not len(test):
    raise ConfigError(f'train and test need images. Found {len(train)} and {len(test)}.')
  tf.keras.utils.set_random_seed(seed)  # Python, numpy and TF: reruns give the same model.
  model = cnn.build_cnn(seed=seed, **dict(model_kwargs or {}))
  model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                metrics=['accuracy'])
  start = time.perf_counter()
  model.fit(to_model_inputs(train.images), train.labels, epochs=epochs, batch_size=batch_size,
            shuffle=True, verbose=0)
  train_seconds = time.perf_counter() - start
  probabilities = model.predict(to_model_inputs(test.images), batch_size=512, verbose=0)
  confusion = confusion_matrix(test.labels, np.argmax(probabilities, axis=1))
  return CentralizedResult(
      accuracy=float(np.trace(confusion) / confusion.sum()),
      per_category_accuracy=per_category_accuracy(confusion),
      confusion=confusion,
      num_train=len(train),
      num_test=len(test),
      epochs=epochs,
      batch_size=batch_size,
      learning_rate=float(learning_rate),
      seed=seed,
      train_seconds=train_seconds)


def phantom_baseline(num_per_category: int, test_per_category: int, *, epochs: int = 5,
                     batch_size: int = 32, learning_rate: float = 3e-3, seed: int = 0,
                     difficulty: float = phantoms.DEFAULT_DIFFICULTY,
                     model_kwargs: Optional[Mapping[str, Any]] = None) -> CentralizedResult:
  """Centralized accuracy on phantoms: train and test drawn from disjoint streams of `seed`."""
  train = phantoms.generate(num_per_category, seed, difficulty=difficulty,
                            stream=phantoms.TRAIN_STREAM)
  test = phantoms.generate(test_per_category, seed, difficulty=difficulty,
                           stream=phantoms.TEST_STREAM)
  return train_centralized(train, test, epochs=epochs, batch_size=batch_size,
                           learning_rate=learning_rate, seed=seed, model_kwargs=model_kwargs)
