"""Class-aware DP aggregation over blocks of clients: ClassAwareFactory.dp without a per-client toll.

ClassAwareFactory.dp makes each sampled client one TFF client value; TFF's C++ worker then pays
milliseconds and about a megabyte per client (issue 16), and the bytes it is sent dominate the
rest. Here one TFF client value carries a block of up to `clients_per_block` clients, only their
sub-updates that are not all zero (a one-image client has one of six), and inside the client
computation every row, that is every client, goes through its category query's own
preprocess_record (TF Privacy: clip to the current clip norm, count whether it was unclipped)
before the rows are summed. The server part is TFF's DifferentiallyPrivateFactory
step by step (derive_sample_params, a sum, get_noised_result, derive_metrics, the DP event), with
the same queries (class_aware.category_query) and the same state, so class_aware.dp_events,
clip_norms, with_released_categories and the ledger read it unchanged, and a checkpoint of either
path restores into the other. Equivalence with ClassAwareFactory.dp: tests/test_block_aggregation.py.
"""

import collections
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_federated.python.aggregators import differential_privacy
from tensorflow_federated.python.core.impl.types import type_conversions

from tff_medical import categories
from tff_medical.aggregation import category_struct
from tff_medical.aggregation import class_aware
from tff_medical.errors import PolicyError

BLOCK_CLIENTS = 'clients'
BLOCK_ROWS = 'rows'
BLOCK_UPDATES = 'updates'

STATE_INNER = category_struct.STATE_INNER
STATE_RELEASED = category_struct.STATE_RELEASED


def _map_tensor_types(fn, type_spec):
  if isinstance(type_spec, tff.TensorType):
    return fn(type_spec)
  if isinstance(type_spec, tff.StructType):
    elements = [(name, _map_tensor_types(fn, t))
                for name, t in tff.structure.iter_elements(type_spec)]
    container = getattr(type_spec, 'python_container', None)
    if container is None:
      return tff.StructType(elements)
    return tff.StructWithPythonType(elements, container)
  raise TypeError(f'a block holds tensors and structs of tensors. Found {type_spec}.')


def _rows_of(tensor_type):
  return tff.TensorType(tensor_type.dtype, [None] + list(tensor_type.shape))


def _row_of(tensor_type):
  if len(tensor_type.shape) < 1 or tensor_type.shape[0] is not None:
    raise TypeError(f'every update tensor of a block must have leading dimension None. '
                    f'Found {tensor_type}.')
  return tff.TensorType(tensor_type.dtype, list(tensor_type.shape)[1:])


def block_type(client_type) -> tff.StructWithPythonType:
  """The TFF client value type of a block of clients (what `pack` makes).

  clients: how many clients the block holds (int32); rows: {category: int32[None]}, the block
  rows (clients) whose sub-update of that category is not all zero; updates: {category: that
  sub-update's tensors with a leading dimension, one entry per listed row}. The zero sub-updates
  (categories a client has no image of) are not sent: the computation puts them back as zero rows
  before the query sees them, so every client is still a record of every category.
  """
  category_struct.check_category_struct(client_type)
  return tff.StructWithPythonType([
      (BLOCK_CLIENTS, tff.TensorType(np.int32)),
      (BLOCK_ROWS, tff.StructWithPythonType(
          [(c, tff.TensorType(np.int32, [None])) for c in categories.CATEGORY_IDS],
          collections.OrderedDict)),
      (BLOCK_UPDATES, _map_tensor_types(_rows_of, client_type)),
  ], collections.OrderedDict)


def _check_block_size(clients_per_block) -> None:
  if (isinstance(clients_per_block, bool) or not isinstance(clients_per_block, (int, np.integer))
      or clients_per_block < 1):
    raise PolicyError(f'clients_per_block must be a positive integer. Found {clients_per_block!r}.')


def _client_type_of_block(value_type):
  """One client's {category: sub-update} type of a block type; TypeError for any other."""
  names = [BLOCK_CLIENTS, BLOCK_ROWS, BLOCK_UPDATES]
  if not isinstance(value_type, tff.StructType) or [
      name for name, _ in tff.structure.iter_elements(value_type)] != names:
    raise TypeError(f'value_type must be a block struct {names}; see block_type. '
                    f'Found {value_type}.')
  if value_type[BLOCK_CLIENTS] != tff.TensorType(np.int32):
    raise TypeError(f'a block\'s {BLOCK_CLIENTS} must be int32. Found {value_type[BLOCK_CLIENTS]}.')
  client_type = _map_tensor_types(_row_of, value_type[BLOCK_UPDATES])
  category_struct.check_category_struct(client_type)
  return client_type


def pack(client_values: Sequence[Any], clients_per_block: int) -> list[collections.OrderedDict]:
  """Client values ({category: sub-update} nests, one a client) as blocks of up to
  `clients_per_block` clients, in order; all-zero sub-updates are left out (see block_type)."""
  _check_block_size(clients_per_block)
  blocks = []
  for start in range(0, len(client_values), clients_per_block):
    clients = list(client_values[start:start + clients_per_block])
    rows, updates = collections.OrderedDict(), collections.OrderedDict()
    for c in categories.CATEGORY_IDS:
      subs = [tf.nest.map_structure(lambda a: np.asarray(a, np.float32), client[c])
              for client in clients]
      kept = [k for k, sub in enumerate(subs)
              if any(np.any(a != 0) for a in tf.nest.flatten(sub))]
      rows[c] = np.array(kept, np.int32)
      updates[c] = tf.nest.map_structure(
          lambda *arrays: np.stack([arrays[k] for k in kept]) if kept
          else np.zeros((0,) + arrays[0].shape, np.float32), *subs)
    blocks.append(collections.OrderedDict([
        (BLOCK_CLIENTS, np.int32(len(clients))), (BLOCK_ROWS, rows), (BLOCK_UPDATES, updates)]))
  return blocks


class BlockClassAwareFactory(tff.aggregators.UnweightedAggregationFactory):
  """ClassAwareFactory.dp's mechanism over block client values (see the module docstring)."""

  def __init__(self,
               queries: Mapping[str, tfp.SumAggregationDPQuery],
               clients_per_block: int,
               combination_weights: Optional[Mapping[str, float]] = None):
    if list(queries) != list(categories.CATEGORY_IDS):
      raise PolicyError(f'queries must have keys {list(categories.CATEGORY_IDS)} in that order. '
                        f'Found {list(queries)}.')
    for c, query in queries.items():
      if not isinstance(query, tfp.SumAggregationDPQuery):
        # Only a sum query's records may be summed inside a block before the federated sum.
        raise PolicyError(f'queries[{c}] must be a tfp.SumAggregationDPQuery. Found {query!r}.')
    _check_block_size(clients_per_block)
    self._queries = dict(queries)
    self._weights = category_struct.combination_weight_vector(combination_weights)
    self._clients_per_block = int(clients_per_block)

  @classmethod
  def dp(cls, splits, clip=category_struct.AdaptiveClipSettings(), combination_weights=None, *,
         clients_per_block: int) -> 'BlockClassAwareFactory':
    """The queries of ClassAwareFactory.dp(splits, clip, combination_weights), over blocks."""
    queries = class_aware.category_queries(splits, clip)
    return cls(collections.OrderedDict((c, queries[c]) for c in categories.CATEGORY_IDS),
               clients_per_block, combination_weights)

  @property
  def is_dp(self) -> bool:
    return True

  @property
  def clients_per_block(self) -> int:
    return self._clients_per_block

  def create(self, value_type) -> tff.templates.AggregationProcess:
    client_type = _client_type_of_block(value_type)
    update_type = category_struct.check_category_struct(client_type)
    cats = categories.CATEGORY_IDS
    queries, weights, num = self._queries, self._weights, categories.NUM_CATEGORIES
    # TFF's own DP process of each category gives the initial state: the same state type and
    # values as ClassAwareFactory.dp's, so readers and checkpoints do not tell the paths apart.
    dp_processes = collections.OrderedDict(
        (c, tff.aggregators.DifferentiallyPrivateFactory(queries[c]).create(update_type))
        for c in cats)
    inner_state_types = collections.OrderedDict(
        (c, p.initialize.type_signature.result.member) for c, p in dp_processes.items())
    released_type = tff.TensorType(np.float32, [num])

    derive_params, get_noised_result, derive_metrics, convert_event = {}, {}, {}, {}
    for c in cats:
      query = queries[c]
      query_state_type = inner_state_types[c].query_state
      derive_params[c] = tff.tensorflow.computation(query.derive_sample_params, query_state_type)
      derive_metrics[c] = tff.tensorflow.computation(query.derive_metrics, query_state_type)
    params_type = tff.StructWithPythonType(
        [(c, derive_params[c].type_signature.result) for c in cats], collections.OrderedDict)

    update_specs = type_conversions.type_to_tf_tensor_specs(update_type)
    flat_specs = tf.nest.flatten(update_specs)
    sizes = [int(np.prod(spec.shape)) for spec in flat_specs]
    # A client's sub-update as one vector: the same record for the query (its clip and norm are
    # over all the record's tensors together), and a fifth of the ops a row.
    flat_record_spec = tf.TensorSpec([sum(sizes)], flat_specs[0].dtype)

    def unflatten_sample_state(query, flat_state):
      """A sample state over flat records, in the form the per-client process sums."""
      leaves = []
      for leaf, zero_leaf in zip(tf.nest.flatten(flat_state),
                                 tf.nest.flatten(query.initial_sample_state(flat_record_spec))):
        if zero_leaf.shape == flat_record_spec.shape:  # A record's sum, not a count.
          parts = tf.split(leaf, sizes)
          leaves += [tf.reshape(part, spec.shape) for part, spec in zip(parts, flat_specs)]
        else:
          leaves.append(leaf)
      return tf.nest.pack_sequence_as(query.initial_sample_state(update_specs), leaves)

    @tff.tensorflow.computation(params_type, value_type)
    def block_records(params, block):
      size = block[BLOCK_CLIENTS]
      rows = []
      for c in cats:
        sent = tf.nest.flatten(category_struct.to_nest(block[BLOCK_UPDATES][c]))
        flat = tf.concat([tf.reshape(t, [-1, n]) for t, n in zip(sent, sizes)], axis=1)
        indices = tf.expand_dims(block[BLOCK_ROWS][c], 1)
        # Every client of the block a row; the ones not sent are the zero sub-updates.
        rows.append(tf.scatter_nd(indices, flat, tf.stack([size, sum(sizes)])))

      # One client (row) at a time, as the per-client process runs each client: the query's own
      # preprocess_record (clip to the current norm, unclipped indicator), then its
      # accumulate_preprocessed_record.
      def body(i, sums):
        new_sums = []
        for c, category_rows, total in zip(cats, rows, sums):
          record = queries[c].preprocess_record(params[c], category_rows[i])
          new_sums.append(queries[c].accumulate_preprocessed_record(total, record))
        return i + 1, tuple(new_sums)

      initial = tuple(queries[c].initial_sample_state(flat_record_spec) for c in cats)
      _, sums = tf.while_loop(lambda i, _: i < size, body, (tf.constant(0), initial))
      return collections.OrderedDict(
          (c, unflatten_sample_state(queries[c], total)) for c, total in zip(cats, sums))

    record_type = block_records.type_signature.result
    for c in cats:
      query = queries[c]

      noised = tff.tensorflow.computation(
          query.get_noised_result, record_type[c], inner_state_types[c].query_state)

      get_noised_result[c] = noised
      convert_event[c] = tff.tensorflow.computation(
          lambda event: event.to_named_tuple(), noised.type_signature.result[2])

    @tff.federated_computation()
    def init_fn():
      inner = collections.OrderedDict((c, p.initialize()) for c, p in dp_processes.items())
      return tff.federated_zip(collections.OrderedDict([
          (STATE_INNER, tff.federated_zip(inner)),
          (STATE_RELEASED, tff.federated_eval(
              tff.tensorflow.computation(lambda: tf.ones([num], tf.float32)), tff.SERVER)),
      ]))

    state_type = init_fn.type_signature.result
    sub_result_type = dp_processes[cats[0]].next.type_signature.result.result.member
    results_type = tff.StructType([(c, sub_result_type) for c in cats])

    @tff.tensorflow.computation(results_type, released_type)
    def combine(results, released):
      scale = tf.constant(weights) * released
      results = category_struct.to_nest(results)
      parts = [tf.nest.map_structure(lambda t, s=scale[i]: tf.cast(s, t.dtype) * t, results[c])
               for i, c in enumerate(cats)]
      return tf.nest.map_structure(lambda *ts: tf.add_n(ts), *parts)

    def make_keep_if_frozen(index, inner_state_type):
      # As ClassAwareFactory: a frozen category keeps its old state (clip norm, DP event).
      @tff.tensorflow.computation(inner_state_type, inner_state_type, released_type)
      def keep_if_frozen(old_state, new_state, released):
        keep_new = released[index] > 0.5
        return tf.nest.map_structure(lambda o, n: tf.where(keep_new, n, o),
                                     category_struct.to_nest(old_state),
                                     category_struct.to_nest(new_state))

      return keep_if_frozen

    keep_fns = collections.OrderedDict(
        (c, make_keep_if_frozen(i, inner_state_types[c])) for i, c in enumerate(cats))

    @tff.federated_computation(state_type, tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      released = state[STATE_RELEASED]
      params = collections.OrderedDict(
          (c, tff.federated_map(derive_params[c], state[STATE_INNER][c].query_state))
          for c in cats)
      records = tff.federated_map(block_records,
                                  (tff.federated_broadcast(tff.federated_zip(params)), value))
      # SumFactory's aggregation (DifferentiallyPrivateFactory's default): a federated sum.
      summed = tff.federated_sum(records)
      new_inner, results, measurements = (collections.OrderedDict(), collections.OrderedDict(),
                                          collections.OrderedDict())
      for c in cats:
        old_state = state[STATE_INNER][c]
        result, new_query_state, event = tff.federated_map(
            get_noised_result[c], (summed[c], old_state.query_state))
        new_state = tff.federated_zip(differential_privacy.DPAggregatorState(
            new_query_state, old_state.agg_state, tff.federated_map(convert_event[c], event),
            tff.federated_value(False, tff.SERVER)))
        new_inner[c] = tff.federated_map(keep_fns[c], (old_state, new_state, released))
        results[c] = result
        measurements[c] = tff.federated_zip(collections.OrderedDict(
            dp_query_metrics=tff.federated_map(derive_metrics[c], new_query_state),
            dp=tff.federated_value((), tff.SERVER)))
      return category_struct.round_output(new_inner, results, measurements, combine, released)

    return tff.templates.AggregationProcess(init_fn, next_fn)
