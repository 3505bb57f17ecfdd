"""The class-aware learning process: distributor, per-category client work, class-aware
aggregator and server optimizer, composed with tff.learning.templates."""

from typing import Callable

import tensorflow as tf
import tensorflow_federated as tff

from tff_medical.aggregation.class_aware import ClassAwareFactory
from tff_medical.models import cnn
from tff_medical.training.client_work import build_per_category_client_work

INPUT_SPEC = (
    tf.TensorSpec(shape=(None,) + cnn.INPUT_SHAPE, dtype=tf.float32),
    tf.TensorSpec(shape=(None,), dtype=tf.int32),
)


def keras_model_fn(build_keras_model: Callable[[], tf.keras.Model]
                   ) -> Callable[[], tff.learning.models.VariableModel]:
  """Wraps a Keras model builder into the no-argument TFF model_fn TFF computations need."""

  def model_fn():
    return tff.learning.models.from_keras_model(
        build_keras_model(), input_spec=INPUT_SPEC,
        loss=tf.keras.losses.SparseCategoricalCrossentropy())

  return model_fn


def build_class_aware_process(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    aggregator_factory: ClassAwareFactory,
    client_optimizer: tff.learning.optimizers.Optimizer,
    server_optimizer: tff.learning.optimizers.Optimizer,
    batch_size: int,
    local_epochs: int = 1,
) -> tff.learning.templates.LearningProcess:
  """DP-FedAvg with per-category sub-updates when the factory is DP, plain FedAvg otherwise."""
  with tf.Graph().as_default():
    weights_type = tff.learning.models.weights_type_from_model(model_fn())

  @tff.tensorflow.computation
  def initial_model_weights_fn():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  distributor = tff.learning.templates.build_broadcast_process(weights_type)
  client_work = build_per_category_client_work(
      model_fn, client_optimizer, batch_size=batch_size, local_epochs=local_epochs,
      release_train_metrics=not aggregator_factory.is_dp)
  result_type = client_work.next.type_signature.result.result.member
  # compose_learning_process wants a weighted aggregator; the weight (1.0 a client) is dropped,
  # as DP-FedAvg weighs clients equally.
  aggregator = tff.aggregators.as_weighted_aggregator(aggregator_factory).create(
      result_type.update, result_type.update_weight)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      server_optimizer, weights_type)
  return tff.learning.templates.compose_learning_process(
      initial_model_weights_fn, distributor, client_work, aggregator, finalizer)
