"""Class-aware DP aggregation over blocks of clients: ClassAwareFactory.dp without a per-client toll.

ClassAwareFactory.dp makes each sampled client one TFF client value; TFF's C++ worker then pays
milliseconds and about a megabyte per client (issue 16). Here one TFF client value carries a
block of up to `clients_per_block` clients (a leading block dimension, zero-padded, with a 0/1
mask), and inside the client computation every row, that is every client, goes through its
category query's own preprocess_record (TF Privacy: clip to the current clip norm, count whether
it was unclipped) before the rows are summed. The server part is TFF's DifferentiallyPrivateFactory
step by step (derive_sample_params, a sum, get_noised_result, derive_metrics, the DP event), with
the same queries (class_aware.category_query) and the same state, so class_aware.dp_events,
clip_norms, with_released_categories and the ledger read it unchanged, and a checkpoint of either
path restores into the other. Equivalence with ClassAwareFactory.dp: tests/test_block_aggregation.py.
"""

import collections
from collections.abc import Mapping, Sequence
import math
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_federated.python.aggregators import differential_privacy
from tensorflow_federated.python.core.impl.types import type_conversions

from tff_medical import categories
from tff_medical.aggregation import category_struct
from tff_medical.errors import PolicyError

BLOCK_MASK = 'mask'
BLOCK_UPDATES = 'updates'

STATE_INNER = category_struct.STATE_INNER
STATE_RELEASED = category_struct.STATE_RELEASED


def _with_leading_dim(type_spec, size: int):
  """`type_spec` with every tensor given a leading dimension of `size`."""
  if isinstance(type_spec, tff.TensorType):
    return tff.TensorType(type_spec.dtype, [size] + list(type_spec.shape))
  if isinstance(type_spec, tff.StructType):
    elements = [(name, _with_leading_dim(t, size))
                for name, t in tff.structure.iter_elements(type_spec)]
    container = getattr(type_spec, 'python_container', None)
    if container is None:
      return tff.StructType(elements)
    return tff.StructWithPythonType(elements, container)
  raise TypeError(f'a block holds tensors and structs of tensors. Found {type_spec}.')


def _without_leading_dim(type_spec, size: int):
  if isinstance(type_spec, tff.TensorType):
    if len(type_spec.shape) < 1 or type_spec.shape[0] != size:
      raise TypeError(f'every tensor of a block must have leading dimension {size}. '
                      f'Found {type_spec}.')
    return tff.TensorType(type_spec.dtype, list(type_spec.shape)[1:])
  if isinstance(type_spec, tff.StructType):
    elements = [(name, _without_leading_dim(t, size))
                for name, t in tff.structure.iter_elements(type_spec)]
    container = getattr(type_spec, 'python_container', None)
    if container is None:
      return tff.StructType(elements)
    return tff.StructWithPythonType(elements, container)
  raise TypeError(f'a block holds tensors and structs of tensors. Found {type_spec}.')


def block_type(client_type, clients_per_block: int) -> tff.StructWithPythonType:
  """The TFF client value type of a block: {mask: float32[B], updates: client_type with [B, ...]}."""
  _check_block_size(clients_per_block)
  category_struct.check_category_struct(client_type)
  return tff.StructWithPythonType([
      (BLOCK_MASK, tff.TensorType(np.float32, [clients_per_block])),
      (BLOCK_UPDATES, _with_leading_dim(client_type, clients_per_block)),
  ], collections.OrderedDict)


def _check_block_size(clients_per_block) -> None:
  if (isinstance(clients_per_block, bool) or not isinstance(clients_per_block, (int, np.integer))
      or clients_per_block < 1):
    raise PolicyError(f'clients_per_block must be a positive integer. Found {clients_per_block!r}.')


def _client_type_of_block(value_type) -> tuple[Any, int]:
  """(one client's {category: sub-update} type, B) of a block type; TypeError for any other."""
  if not isinstance(value_type, tff.StructType) or [
      name for name, _ in tff.structure.iter_elements(value_type)] != [BLOCK_MASK, BLOCK_UPDATES]:
    raise TypeError(f'value_type must be a block struct ({BLOCK_MASK}, {BLOCK_UPDATES}); see '
                    f'block_type. Found {value_type}.')
  mask_type = value_type[BLOCK_MASK]
  if (not isinstance(mask_type, tff.TensorType) or mask_type.dtype != np.float32
      or len(mask_type.shape) != 1 or mask_type.shape[0] is None):
    raise TypeError(f'the block mask must be float32[B]. Found {mask_type}.')
  size = int(mask_type.shape[0])
  client_type = _without_leading_dim(value_type[BLOCK_UPDATES], size)
  category_struct.check_category_struct(client_type)
  return client_type, size


def pack(client_values: Sequence[Any], clients_per_block: int) -> list[collections.OrderedDict]:
  """Client values ({category: sub-update} nests, one a client) as blocks of `clients_per_block`.

  The last block is padded with zero rows whose mask is 0; the order of the clients is kept.
  """
  _check_block_size(clients_per_block)
  blocks = []
  for start in range(0, len(client_values), clients_per_block):
    rows = list(client_values[start:start + clients_per_block])
    padding = clients_per_block - len(rows)
    mask = np.zeros([clients_per_block], np.float32)
    mask[:len(rows)] = 1.0

    def stack(*arrays, padding=padding):
      arrays = [np.asarray(a, np.float32) for a in arrays]
      if padding:
        arrays += [np.zeros_like(arrays[0])] * padding
      return np.stack(arrays)

    blocks.append(collections.OrderedDict([
        (BLOCK_MASK, mask), (BLOCK_UPDATES, tf.nest.map_structure(stack, *rows))]))
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
    weights = combination_weights or {c: 1.0 for c in categories.CATEGORY_IDS}
    if list(weights) != list(categories.CATEGORY_IDS) or not all(
        math.isfinite(w) and w >= 0 for w in weights.values()):
      raise PolicyError('combination_weights must give a non-negative weight to each category '
                        f'in order. Found {dict(weights)!r}.')
    self._queries = dict(queries)
    self._weights = np.array([weights[c] for c in categories.CATEGORY_IDS], np.float32)
    self._clients_per_block = int(clients_per_block)

  @classmethod
  def dp(cls, splits, clip=category_struct.AdaptiveClipSettings(), combination_weights=None, *,
         clients_per_block: int) -> 'BlockClassAwareFactory':
    """The queries of ClassAwareFactory.dp(splits, clip, combination_weights), over blocks."""
    from tff_medical.aggregation import class_aware  # pylint: disable=g-import-not-at-top
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
    client_type, size = _client_type_of_block(value_type)
    if size != self._clients_per_block:
      raise TypeError(f'value_type must be a block of {self._clients_per_block} clients. '
                      f'Found {size}.')
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

    @tff.tensorflow.computation(params_type, value_type)
    def block_records(params, block):
      mask = block[BLOCK_MASK]
      updates = {c: category_struct.to_nest(block[BLOCK_UPDATES][c]) for c in cats}

      # One client (row) at a time, as the per-client process runs each client: the query's own
      # preprocess_record (clip to the current norm, unclipped indicator), then its
      # accumulate_preprocessed_record; a padded row (mask 0) adds zeros.
      def body(i, sums):
        new_sums = []
        for c, total in zip(cats, sums):
          row = tf.nest.map_structure(lambda t, i=i: t[i], updates[c])
          record = queries[c].preprocess_record(params[c], row)
          record = tf.nest.map_structure(lambda r, i=i: r * tf.cast(mask[i], r.dtype), record)
          new_sums.append(queries[c].accumulate_preprocessed_record(total, record))
        return i + 1, tuple(new_sums)

      initial = tuple(queries[c].initial_sample_state(update_specs) for c in cats)
      _, sums = tf.while_loop(lambda i, _: i < tf.shape(mask)[0], body,
                              (tf.constant(0), initial))
      return collections.OrderedDict(zip(cats, sums))

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
      combined = tff.federated_map(combine, (tff.federated_zip(results), released))
      new_state = tff.federated_zip(collections.OrderedDict([
          (STATE_INNER, tff.federated_zip(new_inner)), (STATE_RELEASED, released)]))
      return tff.templates.MeasuredProcessOutput(
          state=new_state, result=combined, measurements=tff.federated_zip(measurements))

    return tff.templates.AggregationProcess(init_fn, next_fn)
