"""The class-aware learning process, composed with tff.learning.templates.

Distributor (broadcast), client work, class-aware aggregator, server-optimizer finalizer. The
client work's client data is each client's per-category sub-updates, computed in-process by
tff_medical.training.local_training (see there why); TFF then does the federated part: the
per-category DP aggregation and the server update.
"""

import collections
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_medical import categories
from tff_medical.aggregation import block
from tff_medical.aggregation.class_aware import ClassAwareFactory
from tff_medical.errors import PolicyError
from tff_medical.models import cnn

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


def sub_update_type(weights_type) -> tff.StructWithPythonType:
  """{category id: trainable weights} — one client's sub-updates."""
  return tff.StructWithPythonType(
      [(c, weights_type.trainable) for c in categories.CATEGORY_IDS], collections.OrderedDict)


def build_class_aware_process(
    build_keras_model: Callable[[], tf.keras.Model],
    aggregator_factory: ClassAwareFactory,
    server_optimizer: tff.learning.optimizers.Optimizer,
    clients_per_block: Optional[int] = None,
) -> tff.learning.templates.LearningProcess:
  """DP-FedAvg over per-category sub-updates when the factory is DP, plain FedAvg otherwise.

  Composed as tff.learning.templates.compose_learning_process composes its parts (same state,
  LearningAlgorithmState), except that the client data is each client's sub-update struct:
  TFF's ClientWorkProcess only admits sequences of raw examples, whose per-client serialization
  is what the in-process training avoids.

  With `clients_per_block`, the factory must be a block.BlockClassAwareFactory of that block
  size, and each TFF client value is a block of clients (`client_values` packs them): the same
  mechanism and state, without TFF's per-client cost.
  """
  is_block = isinstance(aggregator_factory, block.BlockClassAwareFactory)
  if (clients_per_block is not None or is_block) and not (
      is_block and aggregator_factory.clients_per_block == clients_per_block):
    raise PolicyError('clients_per_block must be given exactly with a BlockClassAwareFactory of '
                      f'the same block size. Found {clients_per_block!r} with '
                      f'{type(aggregator_factory).__name__}.')
  model_fn = keras_model_fn(build_keras_model)
  with tf.Graph().as_default():
    weights_type = tff.learning.models.weights_type_from_model(model_fn())
  update_type = sub_update_type(weights_type)
  if clients_per_block is not None:
    update_type = block.block_type(update_type)

  @tff.tensorflow.computation
  def initial_model_weights_fn():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  distributor = tff.learning.templates.build_broadcast_process(weights_type)
  # The weight (1.0 a client) is dropped by as_weighted_aggregator: DP-FedAvg weighs clients
  # equally.
  aggregator = tff.aggregators.as_weighted_aggregator(aggregator_factory).create(
      update_type, tff.TensorType(np.float32))
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      server_optimizer, weights_type)

  @tff.tensorflow.computation(update_type)
  def unit_weight(update):
    del update
    return tf.constant(1.0)

  @tff.federated_computation()
  def init_fn():
    initial_weights = tff.federated_eval(initial_model_weights_fn, tff.SERVER)
    return tff.federated_zip(tff.learning.templates.LearningAlgorithmState(
        initial_weights, distributor.initialize(), tff.federated_value((), tff.SERVER),
        aggregator.initialize(), finalizer.initialize()))

  @tff.federated_computation(init_fn.type_signature.result,
                             tff.FederatedType(update_type, tff.CLIENTS))
  def next_fn(state, sub_updates):
    # Broadcast for the record: the sub-updates were trained from exactly these weights.
    distributor_output = distributor.next(state.distributor, state.global_model_weights)
    aggregator_output = aggregator.next(state.aggregator, sub_updates,
                                        tff.federated_map(unit_weight, sub_updates))
    finalizer_output = finalizer.next(state.finalizer, state.global_model_weights,
                                      aggregator_output.result)
    new_state = tff.federated_zip(tff.learning.templates.LearningAlgorithmState(
        finalizer_output.result, distributor_output.state, state.client_work,
        aggregator_output.state, finalizer_output.state))
    metrics = tff.federated_zip(collections.OrderedDict(
        distributor=distributor_output.measurements, aggregator=aggregator_output.measurements,
        finalizer=finalizer_output.measurements))
    return tff.learning.templates.LearningProcessOutput(new_state, metrics)

  state_type = init_fn.type_signature.result.member

  @tff.tensorflow.computation(state_type)
  def get_model_weights(state):
    return state.global_model_weights

  @tff.tensorflow.computation(state_type, state_type.global_model_weights)
  def set_model_weights(state, model_weights):
    return tff.learning.templates.LearningAlgorithmState(
        model_weights, state.distributor, state.client_work, state.aggregator, state.finalizer)

  return tff.learning.templates.LearningProcess(init_fn, next_fn, get_model_weights,
                                                set_model_weights)


def as_sub_update_structs(sub_updates: list[list[np.ndarray]]) -> collections.OrderedDict:
  """LocalTrainer's [category][variable] arrays as the struct the process takes a client."""
  return collections.OrderedDict(
      (c, list(sub_updates[i])) for i, c in enumerate(categories.CATEGORY_IDS))


def client_values(structs: Sequence[Any], clients_per_block: Optional[int]) -> list[Any]:
  """What the process's next takes a round: the structs, or blocks of them (see above)."""
  if clients_per_block is None:
    return list(structs)
  return block.pack(structs, clients_per_block)
