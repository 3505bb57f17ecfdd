"""The cohort trainer returns, client by client, what LocalTrainer returns."""

import numpy as np
import pytest
import tensorflow as tf

from tff_medical import categories
from tff_medical.models import cnn
from tff_medical.training import cohort
from tff_medical.training import local_training

# Model settings: a random small one, the demo's (configs/demo.py) and the default
# (training/config.py base_config: conv (16, 32), gap head, no pooling).
MODELS = {
    'small_dense': dict(conv_filters=(3,), dense_units=5, input_pooling=8, head='flatten'),
    'demo': dict(conv_filters=(8,), input_pooling=4, head='flatten'),
    'default': dict(conv_filters=(16, 32), input_pooling=1, head='gap'),
}


def _clients(rng, sizes, label_sets=None):
  clients = []
  for i, size in enumerate(sizes):
    allowed = (label_sets[i] if label_sets else range(categories.NUM_CATEGORIES))
    labels = rng.choice(list(allowed), size=size).astype(np.int32)
    clients.append((rng.random((size, 64, 64, 1)).astype(np.float32), labels))
  return clients


def _random_weights(model, rng):
  # Random weights, not the initializer's: the equality must not depend on a lucky start.
  return [rng.normal(0, 0.3, v.shape).astype(np.float32) for v in model.trainable_variables]


def _assert_same(got, want, rtol=2e-4, atol=2e-6):
  assert len(got) == len(want)
  for client, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(g.num_examples, w.num_examples, err_msg=str(client))
    assert g.num_examples.dtype == w.num_examples.dtype
    np.testing.assert_array_equal(g.nonfinite, w.nonfinite, err_msg=str(client))
    # A diverged (zeroed) task's statistics are not compared: how a NaN input travels through
    # ReLU and max pooling differs between TF's Conv2D kernel and the patches matmul.
    finite = w.nonfinite == 0
    np.testing.assert_array_equal(g.correct[finite], w.correct[finite], err_msg=str(client))
    np.testing.assert_allclose(g.loss_sum[finite], w.loss_sum[finite], rtol=rtol, atol=1e-4,
                               err_msg=str(client))
    for c in range(categories.NUM_CATEGORIES):
      for gv, wv in zip(g.sub_updates[c], w.sub_updates[c], strict=True):
        assert gv.shape == wv.shape and gv.dtype == wv.dtype
        np.testing.assert_allclose(gv, wv, rtol=rtol, atol=atol, err_msg=f'{client} {c}')


def _compare(model_kwargs, clients, seeds, batch_size, local_epochs, learning_rate=0.2,
             weight_seed=0, stacked=True):
  build = lambda: cnn.build_cnn(seed=3, **model_kwargs)
  reference = local_training.LocalTrainer(build, learning_rate, batch_size, local_epochs)
  # None: stacked weights for any model; 0: the compiled loop (and LocalTrainer for large
  # clients), as the default model gets by default.
  trainer = cohort.CohortTrainer(build, learning_rate, batch_size, local_epochs,
                                 stacked_max_patch_floats=None if stacked else 0)
  assert trainer.vectorized and trainer.stacked == stacked
  weights = _random_weights(reference.keras_model, np.random.default_rng(weight_seed))
  want = [reference.train(weights, x, y, shuffle_seed=s) for (x, y), s in zip(clients, seeds)]
  got = trainer.train(weights, clients, seeds)
  _assert_same(got, want)
  return got


@pytest.mark.parametrize('model, stacked', [('small_dense', True), ('demo', True),
                                            ('default', True), ('default', False)])
def test_one_image_clients_equal_local_trainer(model, stacked):
  # The demo's shape: one image a client, so five of six sub-updates of each client are zeros.
  rng = np.random.default_rng(1)
  clients = _clients(rng, [1] * 12)
  got = _compare(MODELS[model], clients, [(0, 1, p) for p in range(12)], batch_size=16,
                 local_epochs=1, stacked=stacked)
  assert sum(int(o.num_examples.sum()) for o in got) == 12
  assert all(np.abs(u).max() > 0 for o in got for c in range(6) if o.num_examples[c]
             for u in o.sub_updates[c][::2])


@pytest.mark.parametrize('stacked', [True, False])
def test_multi_step_skewed_clients_equal_local_trainer(stacked):
  # size_skew-like sizes (1 to 200), clients lacking categories, 2 epochs of batches of 8: tasks
  # of 1 to 11 batches with partial last batches, trained in the shuffled order LocalTrainer uses.
  rng = np.random.default_rng(2)
  sizes = [1, 200, 3, 17, 9, 40]
  label_sets = [None, None, [4], [0, 5], [1, 2, 3], [2, 2, 2, 3]]
  clients = _clients(rng, sizes, [s or range(6) for s in label_sets])
  seeds = [(7, 2, p) for p in range(len(sizes))]
  got = _compare(MODELS['demo'], clients, seeds, batch_size=8, local_epochs=2, learning_rate=0.1,
                 stacked=stacked)
  np.testing.assert_array_equal(got[2].num_examples, [0, 0, 0, 0, 6, 0])
  assert all(np.all(u == 0) for c in (0, 1, 2, 3, 5) for u in got[2].sub_updates[c])


def test_shuffle_order_matters_and_is_reproduced():
  # With several steps the order changes the result: the equality above is not order-blind.
  rng = np.random.default_rng(4)
  clients = _clients(rng, [30], [[1]])
  build = lambda: cnn.build_cnn(seed=3, **MODELS['demo'])
  trainer = cohort.CohortTrainer(build, 0.3, batch_size=4)
  weights = _random_weights(trainer.keras_model, rng)
  first, = trainer.train(weights, clients, [(0, 0, 0)])
  second, = trainer.train(weights, clients, [(0, 0, 1)])
  assert not np.allclose(first.sub_updates[1][0], second.sub_updates[1][0], rtol=1e-3)
  reference = local_training.LocalTrainer(build, 0.3, batch_size=4)
  _assert_same([second], [reference.train(weights, *clients[0], shuffle_seed=(0, 0, 1))])


def test_nan_client_is_zeroed_alone():
  rng = np.random.default_rng(5)
  clients = _clients(rng, [4, 5, 6], [[0, 3], [0, 3], [0]])
  x, y = clients[1]
  y[:] = [0, 0, 3, 3, 3]
  x[0, 5, 5, 0] = np.nan  # poisons client 1's category 0 only
  got = _compare(MODELS['demo'], clients, [0, 1, 2], batch_size=2, local_epochs=1)
  _compare(MODELS['demo'], clients, [0, 1, 2], batch_size=2, local_epochs=1, stacked=False)
  np.testing.assert_array_equal(got[1].nonfinite, [1, 0, 0, 0, 0, 0])
  assert all(np.all(u == 0) for u in got[1].sub_updates[0])
  assert all(o.nonfinite.sum() == 0 for o in (got[0], got[2]))
  assert np.abs(got[0].sub_updates[0][0]).max() > 0


def test_memory_budget_splits_calls_without_changing_results():
  rng = np.random.default_rng(6)
  clients = _clients(rng, [1, 2, 5, 1, 3, 20])
  seeds = list(range(6))
  build = lambda: cnn.build_cnn(seed=3, **MODELS['demo'])
  whole = cohort.CohortTrainer(build, 0.2, batch_size=4)
  tiny = cohort.CohortTrainer(build, 0.2, batch_size=4, memory_budget_bytes=1)
  weights = _random_weights(whole.keras_model, rng)
  assert len(tiny._groups(np.array([1, 1, 1]))) == 3  # pylint: disable=protected-access
  _assert_same(tiny.train(weights, clients, seeds), whole.train(weights, clients, seeds),
               rtol=1e-5, atol=1e-7)


def test_default_model_is_looped_and_demo_model_stacked():
  assert not cohort.CohortTrainer(lambda: cnn.build_cnn(**MODELS['default']), 0.1, 16).stacked
  assert cohort.CohortTrainer(lambda: cnn.build_cnn(**MODELS['demo']), 0.1, 16).stacked


def test_model_without_stacked_form_falls_back_to_local_trainer():
  def build():
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(64, 64, 1)),
        tf.keras.layers.Conv2D(2, 3, strides=2, activation='relu'),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(6, activation='softmax')])
  trainer = cohort.CohortTrainer(build, 0.1, batch_size=4)
  assert not trainer.vectorized
  rng = np.random.default_rng(7)
  clients = _clients(rng, [3, 1])
  weights = _random_weights(trainer.keras_model, rng)
  reference = local_training.LocalTrainer(build, 0.1, batch_size=4)
  _assert_same(trainer.train(weights, clients, [0, 1]),
               [reference.train(weights, x, y, shuffle_seed=s)
                for (x, y), s in zip(clients, [0, 1])], rtol=0, atol=0)


def test_empty_cohort_and_mismatched_seeds():
  trainer = cohort.CohortTrainer(lambda: cnn.build_cnn(seed=3, **MODELS['demo']), 0.2, 16)
  weights = [v.numpy() for v in trainer.keras_model.trainable_variables]
  assert trainer.train(weights, []) == []
  with pytest.raises(ValueError, match='one seed a client'):
    trainer.train(weights, _clients(np.random.default_rng(0), [1, 1]), [0])
