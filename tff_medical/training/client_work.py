"""Per-category client work: one local training run per category a client holds.

Sub-update c starts from the broadcast model and sees only the client's category-c examples, so
category-c data influences only sub-aggregate c (the class-aware mechanism's premise). A client
without category c returns zeros for it. A sub-update with a NaN or infinity (a diverged client)
is replaced by zeros on the client: zero is a valid contribution, so the privacy accounting is
unchanged and the global model cannot be corrupted.

Local work is deliberately short (few steps): with only positive labels a many-step sub-update
drifts toward "always predict c" (see the privacy design note, FedAwS).
"""

import collections
import functools
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_medical import categories

CATEGORY_IDS = categories.CATEGORY_IDS


def _train_one_category(model, optimizer, initial_trainable, initial_non_trainable, dataset,
                        category_index, batch_size, local_epochs):
  """Trains `model` from the initial weights on the category's examples; returns its update.

  The update is initial - trained, the sign TFF's finalizer expects (it applies the update as a
  gradient with the server optimizer). Runs inside a tf.function, whose automatic control
  dependencies order the resets, the training loop and the final read.
  """
  for variable, value in zip(model.trainable_variables, initial_trainable):
    variable.assign(value)
  for variable, value in zip(model.non_trainable_variables, initial_non_trainable):
    variable.assign(value)
  category_data = (
      dataset.unbatch()
      .filter(lambda x, y: tf.equal(tf.cast(y, tf.int32), category_index))
      .batch(batch_size)
      .repeat(local_epochs))
  trainable = model.trainable_variables
  specs = tuple(tf.TensorSpec(t.shape, t.dtype) for t in trainable)
  optimizer_state = optimizer.initialize(specs)

  def step(state, batch):
    optimizer_state, num_examples, loss_sum, correct = state
    x, y = batch
    with tf.GradientTape() as tape:
      output = model.forward_pass((x, y), training=True)
    gradients = tape.gradient(output.loss, trainable)
    optimizer_state, new_weights = optimizer.next(optimizer_state, tuple(trainable),
                                                  tuple(gradients))
    for variable, value in zip(trainable, new_weights):
      variable.assign(value)
    batch_size_now = tf.shape(y)[0]
    predictions = tf.argmax(output.predictions, axis=-1, output_type=tf.int32)
    return (optimizer_state, num_examples + batch_size_now,
            loss_sum + output.loss * tf.cast(batch_size_now, tf.float32),
            correct + tf.reduce_sum(tf.cast(tf.equal(predictions, tf.cast(y, tf.int32)),
                                            tf.int32)))

  _, num_examples, loss_sum, correct = category_data.reduce(
      (optimizer_state, tf.constant(0), tf.constant(0.0), tf.constant(0)), step)
  update = [t - tf.identity(v) for v, t in zip(trainable, initial_trainable)]
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in update])
  update = [tf.where(finite, u, tf.zeros_like(u)) for u in update]
  return update, num_examples, loss_sum, correct, finite


def build_per_category_client_work(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    client_optimizer: tff.learning.optimizers.Optimizer,
    batch_size: int,
    local_epochs: int = 1,
    release_train_metrics: bool = False,
) -> tff.learning.templates.ClientWorkProcess:
  """ClientWorkProcess whose update is a struct {category id: trainable-weights delta}.

  `release_train_metrics`: train loss, accuracy and counts are sums over clients' raw data, so
  releasing them is outside the DP guarantee; DP runs leave them off (zeros are released) and
  report evaluation on the central test split instead.
  """
  with tf.Graph().as_default():
    model = model_fn()
  element_type = tff.types.tensorflow_to_type(model.input_spec)
  data_type = tff.SequenceType(element_type)
  weights_type = tff.learning.models.weights_type_from_model(model)

  @tff.federated_computation
  def init_fn():
    return tff.federated_value((), tff.SERVER)

  def _client_update(model, initial_trainable, initial_non_trainable, dataset):
    updates = collections.OrderedDict()
    counts, losses, corrects, nonfinite = [], [], [], []
    for index, category_id in enumerate(CATEGORY_IDS):
      delta, num_examples, loss_sum, correct, finite = _train_one_category(
          model, client_optimizer, initial_trainable, initial_non_trainable, dataset, index,
          batch_size, local_epochs)
      updates[category_id] = delta
      counts.append(num_examples)
      losses.append(loss_sum)
      corrects.append(correct)
      nonfinite.append(tf.cast(tf.logical_not(finite), tf.int32))
    metrics = collections.OrderedDict(
        num_examples=tf.stack(counts), loss_sum=tf.stack(losses), correct=tf.stack(corrects),
        nonfinite_updates=tf.stack(nonfinite))
    if not release_train_metrics:
      metrics = tf.nest.map_structure(tf.zeros_like, metrics)
    return tff.learning.templates.ClientResult(update=updates, update_weight=1.0), metrics

  @tff.tensorflow.computation(weights_type, data_type)
  def client_update(initial_weights, dataset):
    model = model_fn()
    return tf.function(functools.partial(_client_update, model))(
        list(initial_weights.trainable), list(initial_weights.non_trainable), dataset)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, client_data):
    client_result, metrics = tff.federated_map(client_update, (weights, client_data))
    train = tff.federated_sum(metrics)
    return tff.templates.MeasuredProcessOutput(
        state, client_result, tff.federated_zip(collections.OrderedDict(train=train)))

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def summarize_train_metrics(train: dict) -> dict:
  """Per-category and overall train loss/accuracy from the summed client metrics."""
  counts = np.asarray(train['num_examples'], np.float64)
  loss = np.asarray(train['loss_sum'], np.float64)
  correct = np.asarray(train['correct'], np.float64)
  summary = {'num_examples': int(counts.sum()), 'nonfinite_updates':
             int(np.asarray(train['nonfinite_updates']).sum())}
  total = counts.sum()
  summary['loss'] = float(loss.sum() / total) if total else float('nan')
  summary['accuracy'] = float(correct.sum() / total) if total else float('nan')
  for i, category_id in enumerate(CATEGORY_IDS):
    summary[f'accuracy/{category_id}'] = (
        float(correct[i] / counts[i]) if counts[i] else float('nan'))
  return summary
