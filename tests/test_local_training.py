"""Per-category local training: each sub-update is local training on that category alone."""

import numpy as np
import tensorflow as tf

from tff_medical import categories
from tff_medical.models import cnn
from tff_medical.training import local_training

LEARNING_RATE = 0.1


def _build():
  return cnn.build_cnn((2,), seed=7)


def _client(rng, labels):
  return rng.random((len(labels), 64, 64, 1)).astype(np.float32), np.asarray(labels, np.int32)


def _initial_weights():
  return [w.numpy() for w in _build().trainable_weights]


def test_one_step_sub_updates_equal_independent_gradients():
  rng = np.random.default_rng(0)
  x, y = _client(rng, [2, 2, 5, 2, 5])
  trainer = local_training.LocalTrainer(_build, LEARNING_RATE, batch_size=8)
  output = trainer.train(_initial_weights(), x, y)
  reference = _build()
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
  for index, category_id in enumerate(categories.CATEGORY_IDS):
    update = output.sub_updates[index]
    mask = y == index
    if not mask.any():
      assert all(np.all(u == 0) for u in update), category_id
      continue
    with tf.GradientTape() as tape:  # One SGD step on all of the category's examples.
      loss = loss_fn(y[mask], reference(x[mask]))
    expected = [LEARNING_RATE * g.numpy()
                for g in tape.gradient(loss, reference.trainable_weights)]
    for got, want in zip(update, expected):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert any(np.abs(u).max() > 0 for u in update)
  np.testing.assert_array_equal(output.num_examples, np.bincount(y, minlength=6))
  assert output.nonfinite.sum() == 0


def test_category_data_moves_only_its_own_sub_update():
  rng = np.random.default_rng(3)
  x, y = _client(rng, [0, 1, 1, 4, 4, 4])
  trainer = local_training.LocalTrainer(_build, LEARNING_RATE, batch_size=2, local_epochs=2)
  base = trainer.train(_initial_weights(), x, y)
  x_changed = x.copy()
  x_changed[y == 4] = rng.random((3, 64, 64, 1))
  changed = trainer.train(_initial_weights(), x_changed, y)
  for index in range(6):
    same = all(np.array_equal(a, b) for a, b in zip(base.sub_updates[index],
                                                     changed.sub_updates[index]))
    assert same == (index != 4), index


def test_nonfinite_sub_update_is_zeroed_and_counted():
  rng = np.random.default_rng(1)
  x, y = _client(rng, [0, 0, 3])
  x[0, 0, 0, 0] = np.nan  # A corrupt example poisons category 0's gradient only.
  trainer = local_training.LocalTrainer(_build, LEARNING_RATE, batch_size=4)
  output = trainer.train(_initial_weights(), x, y)
  assert all(np.all(u == 0) for u in output.sub_updates[0])
  assert any(np.abs(u).max() > 0 for u in output.sub_updates[3])
  np.testing.assert_array_equal(output.nonfinite, [1, 0, 0, 0, 0, 0])


def test_train_metrics_summary():
  rng = np.random.default_rng(2)
  trainer = local_training.LocalTrainer(_build, LEARNING_RATE, batch_size=4)
  outputs = [trainer.train(_initial_weights(), *_client(rng, labels))
             for labels in ([1, 4], [4, 4, 5])]
  summary = local_training.summarize_train_metrics(outputs)
  assert summary['num_examples'] == 5
  assert 0.0 <= summary['accuracy'] <= 1.0
  assert np.isnan(summary['accuracy/HeadCT'])
