"""Fast surrogate of class-aware DP-FedAvg: the mechanism of tff_medical.training without TFF.

Our own code, not a library's: no public framework runs per-category DP-FedAvg (privacy design
note), and what is timed away here is TFF's per-round overhead, not the math. With one local
step, a client's category-c sub-update is its learning rate times the mean gradient of its
category-c examples at the broadcast model: what tff_medical.training.local_training computes
when the client holds at most client.batch_size images of c and local_epochs is 1 (checked
against LocalTrainer in tests/test_surrogate.py). So a round is: per-example gradients of the
Poisson-sampled clients' examples (vectorized), their mean per (client, category), per-category
clipping at an adaptive clip norm (TFF's geometric update, zero sub-updates counted as
unclipped, the clipped count noised with the calibrated stddev), Gaussian noise at the
calibrated value multiplier, the sum over categories, and the server optimizer (TFF's Adam or
momentum SGD). Noise multipliers and count stddevs come from tff_medical.privacy.accounting, as
in a run; a 100-round setting takes seconds to a minute instead of many minutes.
"""

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tff_medical import categories
from tff_medical.data import model_input
from tff_medical.models import cnn
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling as sampling_lib

SERVER_OPTIMIZERS = ('adam', 'sgdm')


@dataclasses.dataclass(frozen=True)
class Settings:
  """One surrogate run's mechanism and optimization settings (defaults: configs/demo.py's)."""

  clients_per_round: float = 200
  rounds: int = 100
  conv_filters: tuple[int, ...] = (8,)
  input_pooling: int = 4
  head: str = 'flatten'
  client_lr: float = 0.2
  server: str = 'adam'
  server_lr: float = 0.02
  momentum: float = 0.9
  target_unclipped_quantile: float = 5 / 6 + 1 / 12
  initial_clip: float = 0.1
  clip_learning_rate: float = 0.2
  dp: bool = True
  policy_scale: float = 1.0
  max_count_noise_fraction: float = 0.5

  def __post_init__(self):
    if self.server not in SERVER_OPTIMIZERS:
      raise ValueError(f'server must be one of {", ".join(SERVER_OPTIMIZERS)}. '
                       f'Found {self.server!r}.')
    accounting.positive_int('rounds', self.rounds)
    for name in ('clients_per_round', 'client_lr', 'server_lr', 'initial_clip',
                 'clip_learning_rate', 'policy_scale'):
      accounting.positive(name, getattr(self, name))


def target_for_clients(images_per_client: float) -> float:
  """Clip target that puts the clip at the median norm of the clients holding a category.

  A client without category c sends a zero sub-update, counted as unclipped: with six equally
  frequent categories and IID clients of n images, (5/6)**n of the sampled clients lack c, so
  the target is that share plus half of the rest (n = 1: 5/6 + 1/12, the demo's 0.92).
  """
  lacking = (1 - 1 / categories.NUM_CATEGORIES)**images_per_client
  return lacking + 0.5 * (1 - lacking)


def train(x: np.ndarray, y: np.ndarray, index: np.ndarray, offsets: np.ndarray,
          x_eval: np.ndarray, y_eval: np.ndarray, settings: Settings, seed: int,
          eval_every: int = 25, log: Optional[Callable[[str], None]] = None) -> dict:
  """Trains on clients given as CSR rows (client k holds x[index[offsets[k]:offsets[k+1]]]).

  x: float32 (n, 64, 64, 1) in [0, 1]; y: int labels. Returns the final accuracy on
  (x_eval, y_eval), overall and per category, and the accuracy every `eval_every` rounds.
  """
  num_clients, m = len(offsets) - 1, settings.clients_per_round
  sizes = np.diff(offsets)
  if settings.dp:
    policy = policy_lib.default_policy().scaled(settings.policy_scale)
    spec = sampling_lib.SamplingSpec('poisson', num_clients, int(round(m)))
    zs = calibration.calibrate_category_noise(policy, spec, settings.rounds)
    splits = calibration.category_splits(
        zs, m, max_count_noise_fraction=settings.max_count_noise_fraction)
    value_z = np.array([splits[c].value_noise_multiplier for c in categories.CATEGORY_IDS])
    count_std = np.array([splits[c].clipped_count_stddev for c in categories.CATEGORY_IDS])
  model = cnn.build_cnn(tuple(settings.conv_filters), seed=seed,
                        input_pooling=settings.input_pooling, head=settings.head)
  variables = model.trainable_variables
  per_example_gradients = per_example_gradient_fn(model)
  weights = tf.concat([tf.reshape(v, [-1]) for v in variables], 0).numpy().astype(np.float64)
  shapes = [v.shape for v in variables]
  splits_at = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]

  def assign(flat):
    for variable, part in zip(variables, np.split(flat, splits_at)):
      variable.assign(part.reshape(variable.shape).astype(np.float32))

  def evaluate():
    # Calls, not model.predict: predict retraces (and warns) for every new model of a study.
    predicted = np.concatenate([np.argmax(model(x_eval[i:i + 2048], training=False), axis=-1)
                                for i in range(0, len(y_eval), 2048)])
    per = {c: float(np.mean(predicted[y_eval == k] == k))
           for k, c in enumerate(categories.CATEGORY_IDS)}
    return float(np.mean(predicted == y_eval)), per

  rng = np.random.default_rng(seed)
  clip = np.full(categories.NUM_CATEGORIES, settings.initial_clip)
  first, second, velocity = (np.zeros_like(weights) for _ in range(3))
  history = []
  for round_num in range(1, settings.rounds + 1):
    sampled = np.nonzero(rng.random(num_clients) < m / num_clients)[0]
    rows = np.concatenate([index[offsets[k]:offsets[k + 1]] for k in sampled]) if len(
        sampled) else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(sampled)), sizes[sampled])
    updates, group_labels = _sub_updates(per_example_gradients, x[rows], y[rows], owner,
                                         settings.client_lr, weights.shape[0])
    norms = np.linalg.norm(updates, axis=1)
    combined = np.zeros_like(weights)
    for k in range(categories.NUM_CATEGORIES):
      holds = group_labels == k
      if not settings.dp:
        combined += updates[holds].sum(axis=0) / max(len(sampled), 1)
        continue
      factors = np.minimum(1.0, clip[k] / np.maximum(norms[holds], 1e-12))
      noised = (updates[holds] * factors[:, None]).sum(axis=0) + rng.normal(
          0.0, value_z[k] * clip[k], weights.shape)
      combined += noised / m
      # TFF's quantile records are +-0.5 around the expected count; zeros count as unclipped.
      unclipped = (len(sampled) - holds.sum()) + np.sum(norms[holds] <= clip[k])
      fraction = (unclipped - 0.5 * len(sampled) + rng.normal(0.0, count_std[k])) / m + 0.5
      clip[k] *= math.exp(-settings.clip_learning_rate * (
          fraction - settings.target_unclipped_quantile))
    if settings.server == 'adam':  # TFF's build_adam defaults: betas 0.9/0.999, epsilon 1e-7.
      first = 0.9 * first + 0.1 * combined
      second = 0.999 * second + 0.001 * combined**2
      weights -= settings.server_lr * (first / (1 - 0.9**round_num)) / (
          np.sqrt(second / (1 - 0.999**round_num)) + 1e-7)
    else:
      velocity = settings.momentum * velocity + combined
      weights -= settings.server_lr * velocity
    assign(weights)
    if round_num % eval_every == 0 or round_num == settings.rounds:
      accuracy, per = evaluate()
      history.append({'round': round_num, 'accuracy': accuracy})
      if log is not None:
        log(f'round {round_num}: accuracy {accuracy:.3f} per category '
            f'{[round(v, 2) for v in per.values()]}')
  return {'accuracy': accuracy, 'per_category': per, 'history': history,
          'parameters': int(weights.shape[0])}


def _sub_updates(per_example_gradients, x: np.ndarray, y: np.ndarray, owner: np.ndarray,
                 learning_rate: float, dimension: int) -> tuple[np.ndarray, np.ndarray]:
  """(groups, dimension) sub-updates, one per (sampled client, category held), and their labels.

  Row order: by client, then category, so a one-image-client round draws its noise in the
  same order as before this was generalized (docs/TUNING.md's figures still reproduce).
  """
  if not len(y):
    return np.zeros((0, dimension)), np.zeros(0, np.int64)
  gradients = per_example_gradients(tf.constant(x), tf.constant(y, tf.int32)).numpy()
  group_of = owner * categories.NUM_CATEGORIES + y
  groups, inverse, counts = np.unique(group_of, return_inverse=True, return_counts=True)
  sums = np.zeros((len(groups), gradients.shape[1]))
  np.add.at(sums, inverse, gradients.astype(np.float64))
  return learning_rate * sums / counts[:, None], groups % categories.NUM_CATEGORIES


def per_example_gradient_fn(model: tf.keras.Model) -> Callable:
  """(x, y) -> (batch, parameters) gradients of each example's cross-entropy, flattened.

  One forward and one backward pass for the whole batch: each example's gradient of a Conv2D
  kernel is its input patches times its output gradient (and of a Dense kernel, the outer
  product of its input and output gradient), the per-example gradient trick of Goodfellow
  ("Efficient per-example gradient computations", 2015). tf.vectorized_map would do the same
  but falls back to a while loop for Conv2DBackpropFilter (measured ~4 ms an example here).
  Models with other layers than build_cnn's take the vectorized_map route.
  """
  kinds = (tf.keras.layers.AveragePooling2D, tf.keras.layers.Conv2D, tf.keras.layers.MaxPool2D,
           tf.keras.layers.Flatten, tf.keras.layers.GlobalAveragePooling2D,
           tf.keras.layers.Dense)
  if not all(isinstance(layer, kinds) for layer in model.layers) or any(
      isinstance(layer, tf.keras.layers.Conv2D) and (
          layer.strides != (1, 1) or layer.padding != 'same' or layer.dilation_rate != (1, 1))
      for layer in model.layers):
    return _vectorized_gradient_fn(model)
  spec = [tf.TensorSpec([None] + list(model.input_shape[1:]), tf.float32),
          tf.TensorSpec([None], tf.int32)]

  @tf.function(input_signature=spec)
  def gradients(x, y):
    with tf.GradientTape() as tape:
      pre_activations, inputs, activation = [], [], x
      for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
          kh, kw = layer.kernel_size
          patches = tf.image.extract_patches(activation, [1, kh, kw, 1], [1, 1, 1, 1],
                                             [1, 1, 1, 1], 'SAME')
          kernel = tf.reshape(layer.kernel, [-1, layer.filters])
          z = tf.einsum('bhwp,pf->bhwf', patches, kernel) + layer.bias
        elif isinstance(layer, tf.keras.layers.Dense):
          patches = activation
          z = tf.matmul(activation, layer.kernel) + layer.bias
        else:
          activation = layer(activation)
          continue
        tape.watch(z)
        pre_activations.append(z)
        inputs.append(patches)
        # The last Dense's softmax is folded into the loss below.
        activation = z if layer is model.layers[-1] else layer.activation(z)
      loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, activation))
    output_gradients = tape.gradient(loss, pre_activations)
    parts = []
    for patches, g in zip(inputs, output_gradients):
      if g.shape.rank == 4:
        parts += [tf.reshape(tf.einsum('bhwp,bhwf->bpf', patches, g), [tf.shape(g)[0], -1]),
                  tf.reduce_sum(g, axis=[1, 2])]
      else:
        parts += [tf.reshape(tf.einsum('bi,bj->bij', patches, g), [tf.shape(g)[0], -1]), g]
    return tf.concat(parts, axis=1)

  return gradients


def _vectorized_gradient_fn(model: tf.keras.Model) -> Callable:
  variables = model.trainable_variables
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()

  def one_gradient(example):
    xi, yi = example
    with tf.GradientTape() as tape:
      loss = loss_fn(yi[None], model(xi[None], training=True))
    return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, variables)], 0)

  spec = [tf.TensorSpec([None] + list(model.input_shape[1:]), tf.float32),
          tf.TensorSpec([None], tf.int32)]
  return tf.function(lambda x, y: tf.vectorized_map(one_gradient, (x, y)), input_signature=spec)


def one_image_clients(num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """CSR rows of num_examples one-image clients (client k holds example k)."""
  return np.arange(num_examples), np.arange(num_examples + 1)


def as_inputs(images) -> tuple[np.ndarray, np.ndarray]:
  """float32 (n, 64, 64, 1) in [0, 1] and int32 labels of a LabeledImages."""
  return (model_input.to_model_input(images.images),
          images.labels.astype(np.int32))


def mean_min_max(values: Sequence[float]) -> dict:
  return {'mean': float(np.mean(values)), 'min': float(np.min(values)),
          'max': float(np.max(values))}
