"""Per-category local training of a whole cohort of clients in a few compiled calls.

Computes exactly what local_training.LocalTrainer computes for each client (same shuffle, same
batches, same SGD steps, NaN/inf sub-updates zeroed), but not one small loop a client and
category: every (client, category) pair that holds examples is a *task* that starts from the
global model, and tasks with the same number of batches are trained together, their weights
stacked along a leading task axis. A Conv2D is applied as image patches times each task's kernel
and a Dense as each task's matrix (batched matmuls, tf.einsum), so one forward and one backward
pass per local step serve every task of the group. With one-example clients (the demo) a group
is the cohort's per-example gradients; with multi-step clients (local_epochs, size_skew) groups
are padded to their batch count and batch width, and padded examples are masked out of the loss.

Tasks never mix: the per-task loss is the mean over that task's batch, the total is their sum,
so each task's gradient is its own, and a NaN at one client stays in that client's sub-update.

Stacking pays where convolutions are small (the demo's pooled 16x16 input: 15x LocalTrainer at
1,000 one-image clients). Where they are large (the default 64x64 model) the patches matmul is
slower than TF's Conv2D, so the tasks run one after another in one compiled loop with Conv2D,
and clients of LARGE_CLIENT_BATCHES batches or more go to LocalTrainer (little to save there).

Models with layers other than tff_medical.models.cnn.build_cnn's (or a Conv2D with strides,
dilation or 'valid' padding) are trained with LocalTrainer, one client at a time.
"""

import math
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tff_medical import categories
from tff_medical.training import local_training

NUM_CATEGORIES = categories.NUM_CATEGORIES
ClientOutput = local_training.ClientOutput

# Bytes of activations, gradients and stacked weights one compiled call may hold at once; the
# cohort is split into calls under it (a full-resolution model over thousands of examples would
# otherwise need gigabytes in one step).
DEFAULT_MEMORY_BUDGET = 256 * 2**20

# Per-example im2col floats up to which the stacked form is used (see CohortTrainer.__init__):
# the demo model's is 2,304, the default model's 184,320.
DEFAULT_STACKED_MAX_PATCH_FLOATS = 16384

# Without the stacked form, clients of at least this many batches train with LocalTrainer.
LARGE_CLIENT_BATCHES = 3

_POOLS = (tf.keras.layers.AveragePooling2D, tf.keras.layers.MaxPool2D)
_SHAPE_ONLY = (tf.keras.layers.Flatten, tf.keras.layers.GlobalAveragePooling2D)


def _stackable(model: tf.keras.Model) -> bool:
  """Whether every layer has a stacked-weights form here (else LocalTrainer runs)."""
  if not isinstance(model, tf.keras.Sequential) or not model.layers:
    return False
  supported = (tf.keras.layers.Conv2D, tf.keras.layers.Dense) + _POOLS + _SHAPE_ONLY
  activations = (tf.keras.activations.relu, tf.keras.activations.linear)
  for layer in model.layers:
    if type(layer) not in supported or layer.dtype != 'float32':
      return False
    if isinstance(layer, tf.keras.layers.Conv2D) and (
        layer.strides != (1, 1) or layer.padding != 'same' or layer.dilation_rate != (1, 1) or
        layer.groups != 1 or layer.data_format != 'channels_last' or not layer.use_bias or
        layer.activation not in activations):
      return False
    if isinstance(layer, _POOLS) and layer.data_format != 'channels_last':
      return False
    if isinstance(layer, tf.keras.layers.GlobalAveragePooling2D) and (
        layer.keepdims or layer.data_format != 'channels_last'):
      return False
    if isinstance(layer, tf.keras.layers.Dense) and not layer.use_bias:
      return False
    if isinstance(layer, tf.keras.layers.Dense) and layer is not model.layers[-1] and (
        layer.activation not in activations):
      return False
  last = model.layers[-1]
  # The loss is computed from the last Dense's logits, as Keras does for a softmax output.
  if not (isinstance(last, tf.keras.layers.Dense) and
          last.activation is tf.keras.activations.softmax):
    return False
  # Weights are addressed layer by layer: kernel, bias, in the model's own variable order.
  by_layer = [w for layer in model.layers for w in layer.trainable_weights]
  return [id(w) for w in by_layer] == [id(w) for w in model.trainable_variables]


def _per_example_floats(model: tf.keras.Model) -> int:
  """Floats a training step holds per example (inputs, im2col patches, outputs, x3 backward)."""
  shape = list(model.input_shape[1:])
  total = math.prod(shape)
  for layer in model.layers:
    if isinstance(layer, tf.keras.layers.Conv2D):
      total += math.prod(shape[:2]) * math.prod(layer.kernel_size) * shape[2]
    shape = list(layer.compute_output_shape([1] + shape)[1:])
    total += math.prod(shape)
  return 3 * total


def _same_patches(a, kh: int, kw: int):
  """tf.image.extract_patches(a, [1, kh, kw, 1], 'SAME') with stride 1, as shifted slices.

  Same values and (row, column, channel) order, so a Conv2D kernel reshaped to
  (kh * kw * channels, filters) applies to it; 3x faster than ExtractImagePatches on CPU, and
  its gradient is slices' (that op's gradient is slower still).
  """
  h, w = tf.shape(a)[1], tf.shape(a)[2]
  top, left = (kh - 1) // 2, (kw - 1) // 2
  padded = tf.pad(a, [[0, 0], [top, kh - 1 - top], [left, kw - 1 - left], [0, 0]])
  return tf.concat([padded[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                   axis=-1)


def _conv_patch_floats(model: tf.keras.Model) -> int:
  """Floats of the im2col patches of one example, summed over the Conv2D layers."""
  shape, total = list(model.input_shape[1:]), 0
  for layer in model.layers:
    if isinstance(layer, tf.keras.layers.Conv2D):
      total += math.prod(shape[:2]) * math.prod(layer.kernel_size) * shape[2]
    shape = list(layer.compute_output_shape([1] + shape)[1:])
  return total


class CohortTrainer:
  """LocalTrainer's per-category local update, computed for a cohort of clients at once."""

  def __init__(self, build_keras_model: Callable[[], tf.keras.Model], learning_rate: float,
               batch_size: int, local_epochs: int = 1,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
               stacked_max_patch_floats: Optional[int] = DEFAULT_STACKED_MAX_PATCH_FLOATS):
    self._model = build_keras_model()
    self._learning_rate = float(learning_rate)
    self._batch_size = int(batch_size)
    self._local_epochs = int(local_epochs)
    self._shapes = [tuple(v.shape) for v in self._model.trainable_variables]
    self._fallback: Optional[local_training.LocalTrainer] = None
    if not _stackable(self._model):
      self._fallback = local_training.LocalTrainer(build_keras_model, learning_rate, batch_size,
                                                   local_epochs)
      return
    self._example_bytes = 4 * _per_example_floats(self._model)
    self._task_bytes = 4 * 4 * sum(math.prod(s) for s in self._shapes)  # w, grad, new w, slack.
    self._memory_budget = int(memory_budget_bytes)
    image_shape = list(self._model.input_shape[1:])
    signature = [
        [tf.TensorSpec(s, tf.float32) for s in self._shapes],
        tf.TensorSpec([None] + image_shape, tf.float32),  # the cohort's examples + a zero row
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None, None, None], tf.int32),  # [task, batch, slot] -> example, -1 pad
    ]
    self._train_group = tf.function(self._group, input_signature=signature)
    self._train_looped = tf.function(self._group_looped, input_signature=signature)
    # Stacked weights apply a Conv2D as patches times each task's kernel: that wins where the
    # convolutions are small (pooled input, few filters: the demo, one image a client); where
    # they are large (64x64, 16 and 32 filters: the default model) TF's own Conv2D wins, and
    # the tasks run one after another inside one compiled call instead (no per-client Python).
    self._stacked = (_conv_patch_floats(self._model) <= stacked_max_patch_floats
                     if stacked_max_patch_floats is not None else True)
    if not self._stacked:
      self._per_client = local_training.LocalTrainer(build_keras_model, learning_rate,
                                                     batch_size, local_epochs)

  @property
  def keras_model(self) -> tf.keras.Model:
    return self._model

  @property
  def stacked(self) -> bool:
    """Whether tasks train with stacked weights (else one after another in a compiled loop)."""
    return self._fallback is None and self._stacked

  @property
  def vectorized(self) -> bool:
    """False when the model has a layer without a stacked form (one client at a time)."""
    return self._fallback is None

  def _forward(self, weights, x):
    """Logits (tasks, width, classes) of x (tasks, width, ...) under each task's weights."""
    tasks, width = tf.shape(x)[0], tf.shape(x)[1]
    a = tf.reshape(x, tf.concat([[tasks * width], tf.shape(x)[2:]], 0))
    position = 0
    for layer in self._model.layers:
      if isinstance(layer, tf.keras.layers.Conv2D):
        kernel, bias = weights[position], weights[position + 1]
        position += 2
        h, w = tf.shape(a)[1], tf.shape(a)[2]
        patches = tf.reshape(_same_patches(a, *layer.kernel_size), [tasks, width * h * w, -1])
        z = tf.einsum('tnp,tpf->tnf', patches, tf.reshape(kernel, [tasks, -1, layer.filters]))
        z += bias[:, tf.newaxis, :]
        a = layer.activation(tf.reshape(z, [tasks * width, h, w, layer.filters]))
      elif isinstance(layer, tf.keras.layers.Dense):
        kernel, bias = weights[position], weights[position + 1]
        position += 2
        z = tf.einsum('twi,tio->two', tf.reshape(a, [tasks, width, -1]), kernel)
        z += bias[:, tf.newaxis, :]
        if layer is self._model.layers[-1]:
          return z
        a = tf.reshape(layer.activation(z), [tasks * width, -1])
      elif _is_pooling(layer):
        a = _pool(layer, a)
      else:  # Flatten: row-major, as Keras's channels_last Flatten.
        a = tf.reshape(a, [tasks * width, -1])
    raise AssertionError('the last layer is a Dense (checked by _stackable)')

  def _forward_one(self, weights, x):
    """Logits of x (batch, ...) under one task's weights, with TF's own ops (as Keras runs)."""
    a, position = x, 0
    for layer in self._model.layers:
      if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense)):
        kernel, bias = weights[position], weights[position + 1]
        position += 2
        if isinstance(layer, tf.keras.layers.Conv2D):
          z = tf.nn.bias_add(tf.nn.conv2d(a, kernel, 1, 'SAME'), bias)
        else:
          z = tf.nn.bias_add(tf.matmul(a, kernel), bias)
        if layer is self._model.layers[-1]:
          return z
        a = layer.activation(z)
      elif _is_pooling(layer):
        a = _pool(layer, a)
      else:
        a = tf.reshape(a, [tf.shape(a)[0], -1])
    raise AssertionError('the last layer is a Dense (checked by _stackable)')

  def _group_looped(self, initial, examples, labels, index):
    """_group's result, one task after another in a while loop (TF's Conv2D, no padding)."""

    def one_task(task_index):
      weights = list(initial)
      loss_sum, correct = tf.constant(0.0), tf.constant(0)
      for _ in range(self._local_epochs):
        for b in tf.range(tf.shape(task_index)[0]):
          rows = tf.boolean_mask(task_index[b], task_index[b] >= 0)
          x, y = tf.gather(examples, rows), tf.gather(labels, rows)
          with tf.GradientTape() as tape:
            tape.watch(weights)
            logits = self._forward_one(weights, x)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
            loss = tf.reduce_mean(losses)
          gradients = tape.gradient(loss, weights)
          weights = [w - self._learning_rate * g for w, g in zip(weights, gradients)]
          loss_sum += tf.reduce_sum(losses)
          predicted = tf.argmax(tf.nn.softmax(logits), axis=-1, output_type=tf.int32)
          correct += tf.reduce_sum(tf.cast(tf.equal(predicted, y), tf.int32))
      update = [w0 - w for w0, w in zip(initial, weights)]
      finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in update])
      update = [tf.where(finite, u, tf.zeros_like(u)) for u in update]
      return update, loss_sum, correct, tf.cast(tf.logical_not(finite), tf.int32)

    return tf.map_fn(one_task, index, fn_output_signature=(
        [tf.TensorSpec(s, tf.float32) for s in self._shapes], tf.float32, tf.int32, tf.int32),
                     parallel_iterations=1)

  def _group(self, initial, examples, labels, index):
    """Trains a group of tasks with the same batch count; returns LocalTrainer's statistics."""
    tasks, num_batches = tf.shape(index)[0], tf.shape(index)[1]
    weights = [tf.tile(w[tf.newaxis], tf.concat([[tasks], tf.ones_like(tf.shape(w))], 0))
               for w in initial]
    present = index >= 0
    # Pads point at the zero row after the examples: finite, and masked out of the loss.
    safe_index = tf.where(present, index, tf.shape(examples)[0] - 1)
    loss_sum = tf.zeros([tasks])
    correct = tf.zeros([tasks], tf.int32)
    # Python loop over epochs (as LocalTrainer): each epoch sees the same order.
    for _ in range(self._local_epochs):
      for b in tf.range(num_batches):
        slots = safe_index[:, b]
        mask = present[:, b]
        x = tf.gather(examples, slots)
        y = tf.gather(labels, slots)
        with tf.GradientTape() as tape:
          tape.watch(weights)
          logits = self._forward(weights, x)
          losses = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
          losses = tf.where(mask, losses, tf.zeros_like(losses))
          count = tf.reduce_sum(tf.cast(mask, tf.float32), axis=1)
          # The sum of each task's batch mean: each task's gradient is that of its own mean.
          loss = tf.reduce_sum(tf.reduce_sum(losses, axis=1) / count)
        gradients = tape.gradient(loss, weights)
        weights = [w - self._learning_rate * g for w, g in zip(weights, gradients)]
        loss_sum += tf.reduce_sum(losses, axis=1)
        predicted = tf.argmax(tf.nn.softmax(logits), axis=-1, output_type=tf.int32)
        correct += tf.reduce_sum(tf.cast(tf.equal(predicted, y) & mask, tf.int32), axis=1)
    updates = [w0[tf.newaxis] - w for w0, w in zip(initial, weights)]
    finite = tf.reduce_all(tf.stack([
        tf.reduce_all(tf.math.is_finite(tf.reshape(u, [tasks, -1])), axis=1) for u in updates]),
                           axis=0)
    updates = [tf.where(tf.reshape(finite, [-1] + [1] * (len(u.shape) - 1)), u,
                        tf.zeros_like(u)) for u in updates]
    return updates, loss_sum, correct, tf.cast(tf.logical_not(finite), tf.int32)

  def _groups(self, sizes: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """(task positions, batches, batch width) of each compiled call.

    Tasks of one batch count share a call; single-batch tasks are bucketed by the power of two
    at or above their size, so that one 16-example task does not pad a thousand 1-example ones.
    """
    batches = -(-sizes // self._batch_size)
    width = np.where(batches > 1, self._batch_size,
                     np.minimum(self._batch_size, 2**np.ceil(np.log2(np.maximum(sizes, 1)))))
    groups = []
    for key in sorted(set(zip(batches.tolist(), width.astype(int).tolist()))):
      members = np.flatnonzero((batches == key[0]) & (width == key[1]))
      per_task = key[1] * self._example_bytes + self._task_bytes
      chunk = max(1, self._memory_budget // per_task)
      groups += [(members[i:i + chunk], key[0], key[1]) for i in range(0, len(members), chunk)]
    return groups

  def train(self, initial_weights: Sequence[np.ndarray],
            clients: Sequence[tuple[np.ndarray, np.ndarray]],
            shuffle_seeds: Optional[Sequence] = None) -> list[ClientOutput]:
    """Each client's LocalTrainer.train(initial_weights, x, y, shuffle_seed), in client order.

    Args:
      initial_weights: the global model's trainable weights.
      clients: (images float32 (n, 64, 64, 1) in [0, 1], labels (n,)) of each client.
      shuffle_seeds: each client's LocalTrainer shuffle_seed (default 0 for every client).
    """
    if shuffle_seeds is None:
      shuffle_seeds = [0] * len(clients)
    if len(shuffle_seeds) != len(clients):
      raise ValueError(f'shuffle_seeds must have one seed a client. Found {len(shuffle_seeds)} '
                       f'for {len(clients)} clients.')
    initial = [np.asarray(w, np.float32) for w in initial_weights]
    if self._fallback is not None:
      return [self._fallback.train(initial, x, y, shuffle_seed=seed)
              for (x, y), seed in zip(clients, shuffle_seeds)]
    if self._stacked:
      return self._train_tasks(initial, clients, shuffle_seeds)
    # Large convolutions: a client with several batches a category has little per-call
    # overhead to save, and LocalTrainer runs its six categories side by side; the many small
    # clients are what one call a cohort saves.
    outputs = [None] * len(clients)
    small = []
    for k, ((x, y), seed) in enumerate(zip(clients, shuffle_seeds)):
      if len(y) >= LARGE_CLIENT_BATCHES * self._batch_size:
        outputs[k] = self._per_client.train(initial, x, y, shuffle_seed=seed)
      else:
        small.append(k)
    trained = self._train_tasks(initial, [clients[k] for k in small],
                                [shuffle_seeds[k] for k in small])
    for k, output in zip(small, trained):
      outputs[k] = output
    return outputs

  def _train_tasks(self, initial, clients, shuffle_seeds) -> list[ClientOutput]:
    """train() in the compiled group calls."""
    # Tasks: (client, category, example rows in the client's shuffled order), as LocalTrainer
    # shuffles the client's examples once and then takes each category's in that order.
    offsets = np.cumsum([0] + [len(y) for _, y in clients])
    task_client, task_category, task_rows = [], [], []
    counts = np.zeros((len(clients), NUM_CATEGORIES), np.int32)
    for k, ((_, y), seed) in enumerate(zip(clients, shuffle_seeds)):
      y = np.asarray(y)
      # A one-example client's permutation is the identity: skip the generator (demo: 1,000 a
      # round).
      order = (np.random.default_rng(seed).permutation(len(y)) if len(y) > 1 else
               np.zeros(len(y), np.int64))
      shuffled = y[order]
      counts[k] = np.bincount(shuffled, minlength=NUM_CATEGORIES)[:NUM_CATEGORIES]
      for category in np.flatnonzero(counts[k]):
        task_client.append(k)
        task_category.append(category)
        task_rows.append(offsets[k] + order[shuffled == category])
    sub_updates = [[[None] * len(initial) for _ in range(NUM_CATEGORIES)] for _ in clients]
    loss_sum = np.zeros((len(clients), NUM_CATEGORIES), np.float32)
    correct = np.zeros((len(clients), NUM_CATEGORIES), np.int32)
    nonfinite = np.zeros((len(clients), NUM_CATEGORIES), np.int32)
    if task_rows:
      examples = np.concatenate(
          [np.asarray(x, np.float32) for x, _ in clients] +
          [np.zeros((1,) + self._model.input_shape[1:], np.float32)])
      labels = np.concatenate([np.asarray(y, np.int32) for _, y in clients] +
                              [np.zeros(1, np.int32)])
      examples, labels = tf.constant(examples), tf.constant(labels)
      sizes = np.array([len(rows) for rows in task_rows])
      for members, num_batches, width in self._groups(sizes):
        index = np.full((len(members), num_batches * width), -1, np.int32)
        for i, t in enumerate(members):
          index[i, :sizes[t]] = task_rows[t]
        updates, losses, right, bad = (self._train_group if self._stacked else
                                       self._train_looped)(
            initial, examples, labels, index.reshape(len(members), num_batches, width))
        updates = [u.numpy() for u in updates]
        losses, right, bad = losses.numpy(), right.numpy(), bad.numpy()
        for i, t in enumerate(members):
          k, c = task_client[t], task_category[t]
          sub_updates[k][c] = [u[i] for u in updates]
          loss_sum[k, c], correct[k, c], nonfinite[k, c] = losses[i], right[i], bad[i]
    # Categories a client lacks: zeros, as LocalTrainer returns; disjoint views of one block a
    # variable, as thousands of small allocations would cost more than the training.
    missing = [(k, c) for k, client in enumerate(sub_updates)
               for c, update in enumerate(client) if update[0] is None]
    zeros = [np.zeros((len(missing),) + s, np.float32) for s in self._shapes]
    for j, (k, c) in enumerate(missing):
      sub_updates[k][c] = [z[j] for z in zeros]
    return [ClientOutput(sub_updates=sub_updates[k], num_examples=counts[k] * self._local_epochs,
                         loss_sum=loss_sum[k], correct=correct[k], nonfinite=nonfinite[k])
            for k in range(len(clients))]


def _is_pooling(layer) -> bool:
  return isinstance(layer, _POOLS + (tf.keras.layers.GlobalAveragePooling2D,))


def _pool(layer, a: tf.Tensor) -> tf.Tensor:
  """A Keras pooling layer's op on NHWC activations, as Keras runs it."""
  if isinstance(layer, tf.keras.layers.AveragePooling2D):
    return tf.nn.avg_pool2d(a, layer.pool_size, layer.strides, layer.padding.upper())
  if isinstance(layer, tf.keras.layers.MaxPool2D):
    return tf.nn.max_pool2d(a, layer.pool_size, layer.strides, layer.padding.upper())
  return tf.reduce_mean(a, axis=[1, 2])
