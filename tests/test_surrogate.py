"""The surrogate computes the product's sub-updates and refuses bad settings."""

import numpy as np
import pytest

from tff_medical import categories
from tff_medical.benchmarks import surrogate
from tff_medical.data import phantoms
from tff_medical.models import cnn
from tff_medical.training import local_training


def test_sub_updates_equal_local_trainer_for_one_step_clients():
  images = phantoms.generate(3, seed=5)
  x, y = surrogate.as_inputs(images)
  # Three clients of 7, 5 and 6 images: several categories each, at most 16 of one (one step).
  owner = np.repeat([0, 1, 2], [7, 5, 6])
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  build = lambda: cnn.build_cnn((8,), seed=3, input_pooling=4, head='flatten')
  trainer = local_training.LocalTrainer(build, learning_rate=0.2, batch_size=16)
  weights = [v.numpy() for v in trainer.keras_model.trainable_variables]
  gradients = surrogate.per_example_gradient_fn(build())
  updates, labels = surrogate._sub_updates(  # pylint: disable=protected-access
      gradients, x, y, owner, 0.2, sum(w.size for w in weights))
  row = 0
  for client in range(3):
    mine = owner == client
    expected = trainer.train(weights, x[mine], y[mine])
    for k in range(categories.NUM_CATEGORIES):
      if not expected.num_examples[k]:
        continue
      assert labels[row] == k
      flat = np.concatenate([u.ravel() for u in expected.sub_updates[k]])
      np.testing.assert_allclose(updates[row], flat, rtol=1e-4, atol=1e-7)
      row += 1
  assert row == len(updates)


@pytest.mark.parametrize('conv_filters, pooling, head', [((8,), 4, 'flatten'),
                                                         ((4, 8), 2, 'gap')])
def test_one_pass_gradients_equal_vectorized_map(conv_filters, pooling, head):
  model = cnn.build_cnn(conv_filters, dense_units=0, seed=1, input_pooling=pooling, head=head)
  x, y = surrogate.as_inputs(phantoms.generate(2, seed=9))
  fast = surrogate.per_example_gradient_fn(model)(x, y).numpy()
  slow = surrogate._vectorized_gradient_fn(model)(x, y).numpy()  # pylint: disable=protected-access
  assert fast.shape == (len(y), sum(int(np.prod(v.shape)) for v in model.trainable_variables))
  np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-6)


def test_clip_target_counts_clients_without_the_category():
  assert surrogate.target_for_clients(1) == pytest.approx(5 / 6 + 1 / 12)
  # With many images a client almost every client holds every category: the median, 0.5.
  assert surrogate.target_for_clients(200) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize('field, value, message', [
    ('server', 'rmsprop', 'server must be one of'),
    ('rounds', 0, 'rounds must be a positive integer'),
    ('policy_scale', -1.0, 'policy_scale must be positive'),
])
def test_settings_refuse_bad_values(field, value, message):
  with pytest.raises(ValueError, match=message):
    surrogate.Settings(**{field: value})
