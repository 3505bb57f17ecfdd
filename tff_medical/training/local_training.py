"""Per-category local training of one client, in-process with TensorFlow.

Why per category and in-process rather than as a TFF computation: docs/DESIGN.md.
"""

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf

from tff_medical import categories

NUM_CATEGORIES = categories.NUM_CATEGORIES


@dataclasses.dataclass
class ClientOutput:
  """One client's sub-updates (initial - trained, per category) and raw-data statistics."""

  sub_updates: list[list[np.ndarray]]  # [category][trainable variable]
  num_examples: np.ndarray  # (6,) examples trained per category
  loss_sum: np.ndarray  # (6,) summed loss over the local steps' examples
  correct: np.ndarray  # (6,)
  nonfinite: np.ndarray  # (6,) 1 where a sub-update was zeroed


class LocalTrainer:
  """Compiles the per-category local update of a Keras model once; reuses it for every client."""

  def __init__(self, build_keras_model: Callable[[], tf.keras.Model], learning_rate: float,
               batch_size: int, local_epochs: int = 1):
    self._model = build_keras_model()
    self._variables = self._model.trainable_variables
    self._loss = tf.keras.losses.SparseCategoricalCrossentropy(
        reduction=tf.keras.losses.Reduction.NONE)
    self._learning_rate = float(learning_rate)
    self._batch_size = int(batch_size)
    self._local_epochs = int(local_epochs)
    self._update = tf.function(
        self._all_categories,
        input_signature=[
            [tf.TensorSpec(v.shape, v.dtype) for v in self._variables],
            tf.TensorSpec([None, categories.IMAGE_SIZE, categories.IMAGE_SIZE, 1], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ])

  @property
  def keras_model(self) -> tf.keras.Model:
    return self._model

  def _one_category(self, initial, x, y):
    for variable, value in zip(self._variables, initial):
      variable.assign(value)
    n = tf.shape(y)[0]
    num_batches = (n + self._batch_size - 1) // self._batch_size
    loss_sum = tf.constant(0.0)
    correct = tf.constant(0)
    for _ in range(self._local_epochs):
      for b in tf.range(num_batches):
        start = b * self._batch_size
        xb = x[start:start + self._batch_size]
        yb = y[start:start + self._batch_size]
        with tf.GradientTape() as tape:
          probabilities = self._model(xb, training=True)
          losses = self._loss(yb, probabilities)
          loss = tf.reduce_mean(losses)
        gradients = tape.gradient(loss, self._variables)
        for variable, gradient in zip(self._variables, gradients):
          variable.assign_sub(self._learning_rate * gradient)
        loss_sum += tf.reduce_sum(losses)
        predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        correct += tf.reduce_sum(tf.cast(tf.equal(predicted, yb), tf.int32))
    update = [value - tf.identity(variable) for variable, value in zip(self._variables, initial)]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in update])
    update = [tf.where(finite, u, tf.zeros_like(u)) for u in update]
    return update, n * self._local_epochs, loss_sum, correct, finite

  def _all_categories(self, initial, x, y):
    updates, counts, losses, corrects, nonfinite = [], [], [], [], []
    for category in range(NUM_CATEGORIES):
      mask = tf.equal(y, category)
      update, count, loss_sum, correct, finite = self._one_category(
          initial, tf.boolean_mask(x, mask), tf.boolean_mask(y, mask))
      updates.append(update)
      counts.append(count)
      losses.append(loss_sum)
      corrects.append(correct)
      nonfinite.append(tf.cast(tf.logical_not(finite), tf.int32))
    return updates, tf.stack(counts), tf.stack(losses), tf.stack(corrects), tf.stack(nonfinite)

  def train(self, initial_weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
            shuffle_seed=0) -> ClientOutput:
    """Sub-updates of a client holding images `x` (float32 (n,64,64,1) in [0,1]), labels `y`."""
    order = np.random.default_rng(shuffle_seed).permutation(len(y))
    updates, counts, losses, corrects, nonfinite = self._update(
        [np.asarray(w) for w in initial_weights], tf.constant(x[order], tf.float32),
        tf.constant(np.asarray(y)[order], tf.int32))
    return ClientOutput(
        sub_updates=[[u.numpy() for u in category] for category in updates],
        num_examples=counts.numpy(), loss_sum=losses.numpy(), correct=corrects.numpy(),
        nonfinite=nonfinite.numpy())


def summarize_train_metrics(outputs: list[ClientOutput]) -> dict:
  """Per-category and overall train loss/accuracy over a round's clients (raw data: non-DP only)."""
  counts = np.sum([o.num_examples for o in outputs], axis=0).astype(np.float64)
  loss = np.sum([o.loss_sum for o in outputs], axis=0)
  correct = np.sum([o.correct for o in outputs], axis=0)
  total = counts.sum()
  summary = {'num_examples': int(total),
             'nonfinite_updates': int(np.sum([o.nonfinite for o in outputs])),
             'loss': float(loss.sum() / total) if total else float('nan'),
             'accuracy': float(correct.sum() / total) if total else float('nan')}
  for i, category_id in enumerate(categories.CATEGORY_IDS):
    summary[f'accuracy/{category_id}'] = (
        float(correct[i] / counts[i]) if counts[i] else float('nan'))
  return summary
