"""Fast surrogate of class-aware DP-FedAvg for tuning, scored on a validation draw only.

With one image a client and one local step, a client's category sub-update is its learning rate
times its example's gradient, so a round is: per-example gradients of the Poisson-sampled
clients (vectorized), per-category clipping at an adaptive clip norm (TFF's geometric update,
zero sub-updates counted as unclipped, the clipped count noised with the calibrated stddev),
Gaussian noise at the calibrated value multiplier, the sum over categories, and the server
optimizer. That is the mechanism of tff_medical.training.process for such clients, without
TFF's per-round overhead, so a 100-round setting is scored in seconds instead of minutes.
Noise multipliers and count stddevs come from tff_medical.privacy.accounting, as in a run.

Scores are on a fresh phantom draw (seed 1000 + seed), never on the test split a run reports;
the chosen setting is then confirmed by the real program (README, docs/TUNING.md).

  .venv/bin/python experiments/tune_surrogate.py --model=pool4_flatten --conv_filters=8 \\
      --server=adam --server_lr=0.02 --clients_per_round=200 --rounds=100
"""

import json
import math
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from tff_medical import categories  # pylint: disable=g-import-not-at-top
from tff_medical.data import phantoms  # pylint: disable=g-import-not-at-top
from tff_medical.models import cnn  # pylint: disable=g-import-not-at-top
from tff_medical.privacy import accounting  # pylint: disable=g-import-not-at-top
from tff_medical.privacy import policy as policy_lib  # pylint: disable=g-import-not-at-top
from tff_medical.privacy import sampling as sampling_lib  # pylint: disable=g-import-not-at-top

_NUM_PER_CATEGORY = flags.DEFINE_integer('num_per_category', 1500, 'Phantoms per category; '
                                         '10% are held out as the run\'s test split.')
_CLIENTS_PER_ROUND = flags.DEFINE_float('clients_per_round', 200, 'Expected clients a round.')
_ROUNDS = flags.DEFINE_integer('rounds', 100, 'Rounds (the calibration horizon).')
_MODEL = flags.DEFINE_enum('model', 'pool4_flatten',
                           ['gap', 'pool4_gap', 'pool2_flatten', 'pool4_flatten'], 'Model shape.')
_CONV_FILTERS = flags.DEFINE_list('conv_filters', ['8'], 'Filters of each conv block.')
_CLIENT_LR = flags.DEFINE_float('client_lr', 0.2, 'Client learning rate (one step).')
_SERVER = flags.DEFINE_enum('server', 'adam', ['adam', 'sgdm'], 'Server optimizer.')
_SERVER_LR = flags.DEFINE_float('server_lr', 0.02, 'Server learning rate.')
_MOMENTUM = flags.DEFINE_float('momentum', 0.9, 'Server momentum (sgdm).')
_TARGET = flags.DEFINE_float('target_unclipped_quantile', None,
                             'Default: 5/6 + 1/12 (five in six clients send zeros).')
_INITIAL_CLIP = flags.DEFINE_float('initial_clip', 0.1, 'Initial clip norm.')
_CLIP_LR = flags.DEFINE_float('clip_learning_rate', 0.2, 'Adaptive clip learning rate.')
_DP = flags.DEFINE_bool('dp', True, 'Noise and clipping on.')
_POLICY_SCALE = flags.DEFINE_float('policy_scale', 1.0, 'Every epsilon times this.')
_SEED = flags.DEFINE_integer('seed', 0, 'Data, model and noise seed.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 25, 'Rounds between validation scores.')

_MODELS = {'gap': (1, 'gap'), 'pool4_gap': (4, 'gap'), 'pool2_flatten': (2, 'flatten'),
           'pool4_flatten': (4, 'flatten')}


def _as_inputs(images):
  return (images.images.astype(np.float32) / 255.0)[..., np.newaxis], images.labels.astype(
      np.int32)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  seed = _SEED.value
  x_all, y_all = _as_inputs(phantoms.generate(_NUM_PER_CATEGORY.value, seed=seed))
  held_out = len(y_all) // 10  # The run's test split: never trained on, never scored here.
  x, y = x_all[held_out:], y_all[held_out:]
  x_val, y_val = _as_inputs(phantoms.generate(max(100, _NUM_PER_CATEGORY.value // 10),
                                              seed=1000 + seed))
  num_clients, m = len(y), _CLIENTS_PER_ROUND.value
  policy = policy_lib.default_policy().scaled(_POLICY_SCALE.value)
  if _DP.value:
    spec = sampling_lib.SamplingSpec('poisson', num_clients, int(round(m)))
    zs = accounting.calibrate_category_noise(policy, spec, _ROUNDS.value)
    splits = accounting.category_splits(zs, m, max_count_noise_fraction=0.5)
    value_z = np.array([splits[c].value_noise_multiplier for c in categories.CATEGORY_IDS])
    count_std = np.array([splits[c].clipped_count_stddev for c in categories.CATEGORY_IDS])
  pooling, head = _MODELS[_MODEL.value]
  model = cnn.build_cnn(tuple(int(f) for f in _CONV_FILTERS.value), seed=seed,
                        input_pooling=pooling, head=head)
  variables = model.trainable_variables
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()

  def one_gradient(example):
    xi, yi = example
    with tf.GradientTape() as tape:
      loss = loss_fn(yi[None], model(xi[None], training=True))
    return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, variables)], 0)

  per_example_gradients = tf.function(lambda xb, yb: tf.vectorized_map(one_gradient, (xb, yb)))
  weights = tf.concat([tf.reshape(v, [-1]) for v in variables], 0).numpy().astype(np.float64)
  sizes = [int(np.prod(v.shape)) for v in variables]

  def assign(flat):
    for variable, part in zip(variables, np.split(flat, np.cumsum(sizes)[:-1])):
      variable.assign(part.reshape(variable.shape).astype(np.float32))

  def validate():
    predicted = np.argmax(model.predict(x_val, batch_size=512, verbose=0), axis=-1)
    per = [float(np.mean(predicted[y_val == k] == k)) for k in range(categories.NUM_CATEGORIES)]
    return float(np.mean(predicted == y_val)), per

  rng = np.random.default_rng(seed)
  target = _TARGET.value if _TARGET.value is not None else 5 / 6 + 1 / 12
  clip = np.full(categories.NUM_CATEGORIES, _INITIAL_CLIP.value)
  first, second, velocity = (np.zeros_like(weights) for _ in range(3))
  start, history = time.perf_counter(), []
  for round_num in range(1, _ROUNDS.value + 1):
    sampled = np.nonzero(rng.random(num_clients) < m / num_clients)[0]
    updates = per_example_gradients(tf.constant(x[sampled]), tf.constant(y[sampled])).numpy()
    updates = updates.astype(np.float64) * _CLIENT_LR.value
    norms = np.linalg.norm(updates, axis=1)
    combined = np.zeros_like(weights)
    for k in range(categories.NUM_CATEGORIES):
      holds = y[sampled] == k
      if not _DP.value:
        combined += updates[holds].sum(axis=0) / max(len(sampled), 1)
        continue
      factors = np.minimum(1.0, clip[k] / np.maximum(norms[holds], 1e-12))
      noised = (updates[holds] * factors[:, None]).sum(axis=0) + rng.normal(
          0.0, value_z[k] * clip[k], weights.shape)
      combined += noised / m
      # TFF's quantile records are +-0.5 around the expected count; zeros count as unclipped.
      unclipped = (len(sampled) - holds.sum()) + np.sum(norms[holds] <= clip[k])
      fraction = (unclipped - 0.5 * len(sampled) + rng.normal(0.0, count_std[k])) / m + 0.5
      clip[k] *= math.exp(-_CLIP_LR.value * (fraction - target))
    if _SERVER.value == 'adam':  # TFF's build_adam defaults: betas 0.9/0.999, epsilon 1e-7.
      first = 0.9 * first + 0.1 * combined
      second = 0.999 * second + 0.001 * combined**2
      weights -= _SERVER_LR.value * (first / (1 - 0.9**round_num)) / (
          np.sqrt(second / (1 - 0.999**round_num)) + 1e-7)
    else:
      velocity = _MOMENTUM.value * velocity + combined
      weights -= _SERVER_LR.value * velocity
    assign(weights)
    if round_num % _EVAL_EVERY.value == 0 or round_num == _ROUNDS.value:
      accuracy, per = validate()
      history.append({'round': round_num, 'accuracy': accuracy})
      print(f'round {round_num}: validation accuracy {accuracy:.3f} per category '
            f'{[round(v, 2) for v in per]} ({time.perf_counter() - start:.0f} s)', flush=True)
  print(json.dumps({'flags': {name: flags.FLAGS[name].value for name in (
      'num_per_category', 'clients_per_round', 'rounds', 'model', 'conv_filters', 'client_lr',
      'server', 'server_lr', 'dp', 'policy_scale', 'seed')},
                    'parameters': int(sum(sizes)), 'validation_accuracy': accuracy,
                    'validation_per_category': dict(zip(categories.CATEGORY_IDS, per)),
                    'history': history}))


if __name__ == '__main__':
  app.run(main)
