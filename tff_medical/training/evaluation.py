"""Evaluation of the global model on the central test split: accuracy, loss, confusion matrix.

The central test split is server-side data kept apart from every client, so evaluating on it
releases nothing about the clients and costs no privacy budget.
"""

import numpy as np
import tensorflow as tf

from tff_medical import categories


def evaluate(keras_model: tf.keras.Model, dataset: tf.data.Dataset) -> dict:
  """Overall and per-category accuracy and loss, and the confusion matrix (rows: true)."""
  num = categories.NUM_CATEGORIES
  confusion = np.zeros((num, num), np.int64)
  loss_sum = np.zeros(num, np.float64)
  for x, y in dataset:
    probabilities = keras_model(x, training=False).numpy()
    labels = y.numpy()
    predictions = probabilities.argmax(axis=1)
    np.add.at(confusion, (labels, predictions), 1)
    picked = probabilities[np.arange(len(labels)), labels]
    np.add.at(loss_sum, labels, -np.log(np.clip(picked, 1e-7, 1.0)))
  counts = confusion.sum(axis=1)
  total = counts.sum()
  result = {
      'accuracy': float(np.trace(confusion) / total) if total else float('nan'),
      'loss': float(loss_sum.sum() / total) if total else float('nan'),
      'num_examples': int(total),
      'confusion_matrix': confusion.tolist(),
  }
  for i, category_id in enumerate(categories.CATEGORY_IDS):
    result[f'accuracy/{category_id}'] = (
        float(confusion[i, i] / counts[i]) if counts[i] else float('nan'))
    result[f'loss/{category_id}'] = float(loss_sum[i] / counts[i]) if counts[i] else float('nan')
  return result
