"""Per-category client work: each sub-update is local training on that category alone."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_medical import categories
from tff_medical.models import cnn
from tff_medical.training import client_work
from tff_medical.training import process

LEARNING_RATE = 0.1


def _build():
  return cnn.build_cnn((2,), seed=7)


def _client_dataset(rng, labels):
  x = rng.random((len(labels), 64, 64, 1)).astype(np.float32)
  y = np.asarray(labels, np.int32)
  return x, y


@pytest.mark.usefixtures('tff_context')
def test_one_step_sub_updates_equal_independent_gradients():
  rng = np.random.default_rng(0)
  x, y = _client_dataset(rng, [2, 2, 5, 2, 5])
  work = client_work.build_per_category_client_work(
      process.keras_model_fn(_build), tff.learning.optimizers.build_sgdm(LEARNING_RATE),
      batch_size=8,
      release_train_metrics=True)
  keras_model = _build()
  weights = tff.learning.models.ModelWeights(
      trainable=[w.numpy() for w in keras_model.trainable_weights],
      non_trainable=[w.numpy() for w in keras_model.non_trainable_weights])
  output = work.next(work.initialize(), [weights],
                     [tf.data.Dataset.from_tensor_slices((x, y)).batch(2)])
  result = output.result[0]
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
  for index, category_id in enumerate(categories.CATEGORY_IDS):
    update = [np.asarray(u) for u in result.update[category_id]]
    mask = y == index
    if not mask.any():
      assert all(np.all(u == 0) for u in update), category_id
      continue
    # One SGD step on the category's examples (one batch of 8 holds them all).
    with tf.GradientTape() as tape:
      loss = loss_fn(y[mask], keras_model(x[mask]))
    expected = [LEARNING_RATE * g.numpy()
                for g in tape.gradient(loss, keras_model.trainable_weights)]
    for got, want in zip(update, expected):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert any(np.abs(u).max() > 0 for u in update)
  train = output.measurements['train']
  np.testing.assert_array_equal(train['num_examples'], np.bincount(y, minlength=6))
  assert int(np.sum(train['nonfinite_updates'])) == 0


@pytest.mark.usefixtures('tff_context')
def test_nonfinite_sub_update_is_zeroed_and_counted():
  rng = np.random.default_rng(1)
  x, y = _client_dataset(rng, [0, 0, 3])
  x[0, 0, 0, 0] = np.nan  # A corrupt example poisons category 0's gradient only.
  work = client_work.build_per_category_client_work(
      process.keras_model_fn(_build), tff.learning.optimizers.build_sgdm(LEARNING_RATE),
      batch_size=4, release_train_metrics=True)
  keras_model = _build()
  weights = tff.learning.models.ModelWeights(
      trainable=[w.numpy() for w in keras_model.trainable_weights], non_trainable=[])
  output = work.next(work.initialize(), [weights],
                     [tf.data.Dataset.from_tensor_slices((x, y)).batch(4)])
  update = output.result[0].update
  assert all(np.all(np.asarray(u) == 0) for u in update['HeadCT'])
  assert any(np.abs(np.asarray(u)).max() > 0 for u in update['ChestCT'])
  assert int(np.sum(output.measurements['train']['nonfinite_updates'])) == 1


@pytest.mark.usefixtures('tff_context')
def test_dp_runs_release_no_train_metrics():
  rng = np.random.default_rng(2)
  x, y = _client_dataset(rng, [1, 4])
  work = client_work.build_per_category_client_work(
      process.keras_model_fn(_build), tff.learning.optimizers.build_sgdm(LEARNING_RATE),
      batch_size=4, release_train_metrics=False)
  keras_model = _build()
  weights = tff.learning.models.ModelWeights(
      trainable=[w.numpy() for w in keras_model.trainable_weights], non_trainable=[])
  output = work.next(work.initialize(), [weights],
                     [tf.data.Dataset.from_tensor_slices((x, y)).batch(4)])
  train = output.measurements['train']
  assert all(np.all(np.asarray(v) == 0) for v in train.values())
