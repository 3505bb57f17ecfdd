"""Blocks of clients (aggregation/block.py) against the per-client ClassAwareFactory.

Same inputs, same queries: with the noise at zero both paths are deterministic and must give the
same released update, state (clip norms, quantile estimates, DP events) and measurements, round
after round, frozen categories included; with the calibrated noise, the released noise has the
same standard deviation and the DP events the ledger reads are the same.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp

from tff_medical import categories
from tff_medical.aggregation import block
from tff_medical.aggregation import class_aware
from tff_medical.errors import PolicyError
from tff_medical.privacy import calibration

from helpers import assert_gaussian_noise  # pylint: disable=g-bad-import-order

CATS = categories.CATEGORY_IDS
WEIGHTS = {c: w for c, w in zip(CATS, [0.5, 1.0, 2.0, 0.0, 1.5, 3.0])}


def _client_type(size):
  update = tff.StructWithPythonType([('w', tff.TensorType(np.float32, [size])),
                                     ('b', tff.TensorType(np.float32, [2]))],
                                    collections.OrderedDict)
  return tff.StructWithPythonType([(c, update) for c in CATS], collections.OrderedDict)


def _client_values(w, b):
  """w[k, c, :], b[k, c, :] -> one {category: {w, b}} struct per client k."""
  return [collections.OrderedDict(
      (c, collections.OrderedDict(w=w[k, i].astype(np.float32), b=b[k, i].astype(np.float32)))
      for i, c in enumerate(CATS)) for k in range(w.shape[0])]


def _noiseless_queries(clients):
  """ClassAwareFactory.dp's query form (class_aware.category_query) with both noises at zero,
  a different starting clip per category so that some clients clip and some do not; a target
  no fraction of 10 clients equals, so that every clip moves each round."""
  return collections.OrderedDict((c, tfp.NormalizedQuery(tfp.QuantileAdaptiveClipSumQuery(
      initial_l2_norm_clip=0.3 + 0.4 * i, noise_multiplier=0.0, target_unclipped_quantile=0.55,
      learning_rate=0.2, clipped_count_stddev=0.0, expected_num_records=clients,
      geometric_update=True), denominator=clients)) for i, c in enumerate(CATS))


def _per_client_process(queries, size):
  factories = collections.OrderedDict(
      (c, tff.aggregators.DifferentiallyPrivateFactory(q)) for c, q in queries.items())
  return class_aware.ClassAwareFactory(factories, WEIGHTS, is_dp=True).create(_client_type(size))


def _assert_same(a, b):
  flat_a, flat_b = tf.nest.flatten(a), tf.nest.flatten(b)
  assert len(flat_a) == len(flat_b) > 0
  for x, y in zip(flat_a, flat_b):
    if isinstance(x, (bytes, str)) or np.asarray(x).dtype.kind in 'SUO':  # DP event names.
      assert np.array_equal(np.asarray(x), np.asarray(y)), (x, y)
    else:
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                 rtol=2e-5, atol=1e-6)


# --- Packing and refusals (no execution) --------------------------------------------------------


def test_pack_keeps_order_and_leaves_out_zero_sub_updates():
  rng = np.random.default_rng(0)
  w, b = rng.normal(size=(7, 6, 3)), rng.normal(size=(7, 6, 2))
  w[[1, 4], 2], b[[1, 4], 2] = 0.0, 0.0  # Clients 1 and 4 hold no AbdomenCT image.
  w[6, 2] = 0.0  # Client 6: its AbdomenCT sub-update is not all zero (b is).
  blocks = block.pack(_client_values(w, b), 3)
  assert [int(blk[block.BLOCK_CLIENTS]) for blk in blocks] == [3, 3, 1]
  rows = [blk[block.BLOCK_ROWS]['AbdomenCT'].tolist() for blk in blocks]
  assert rows == [[0, 2], [0, 2], [0]]
  np.testing.assert_array_equal(blocks[1][block.BLOCK_UPDATES]['AbdomenCT']['w'],
                                w[[3, 5], 2].astype(np.float32))
  cxr = np.concatenate([blk[block.BLOCK_UPDATES]['CXR']['b'] for blk in blocks])
  np.testing.assert_array_equal(cxr, b[:, CATS.index('CXR')].astype(np.float32))
  assert block.pack([], 3) == []


@pytest.mark.parametrize('size', [0, -2, 2.5, True, None])
def test_refuses_block_sizes_that_are_not_positive_integers(size):
  with pytest.raises(PolicyError, match='clients_per_block must be a positive integer'):
    block.pack([], size)


def test_block_type_and_its_refusals():
  value_type = block.block_type(_client_type(3))
  assert value_type[block.BLOCK_ROWS]['Hand'] == tff.TensorType(np.int32, [None])
  assert value_type[block.BLOCK_UPDATES]['Hand']['w'] == tff.TensorType(np.float32, [None, 3])
  factory = block.BlockClassAwareFactory(_noiseless_queries(4.0), 4)
  with pytest.raises(TypeError, match='block struct'):
    factory.create(_client_type(3))
  with pytest.raises(PolicyError, match='SumAggregationDPQuery'):
    block.BlockClassAwareFactory(dict(_noiseless_queries(4.0), Hand='not a query'), 4)
  with pytest.raises(PolicyError, match='combination_weights'):
    block.BlockClassAwareFactory(_noiseless_queries(4.0), 4, dict(WEIGHTS, Hand=-1.0))


# --- Equivalence with the per-client factory ----------------------------------------------------


@pytest.mark.usefixtures('tff_context')
class TestEquivalence:

  def test_same_states_as_per_client_dp_factory(self):
    """Same initial state type and values: a checkpoint of either path restores into the other."""
    splits = {c: calibration.adaptive_clip_split(1.0 + 0.5 * i, 10.0, 5.0)
              for i, c in enumerate(CATS)}
    clip = class_aware.AdaptiveClipSettings(0.2, 0.7, 0.3)
    per_client = class_aware.ClassAwareFactory.dp(splits, clip, WEIGHTS).create(_client_type(3))
    blocks = block.BlockClassAwareFactory.dp(splits, clip, WEIGHTS, clients_per_block=4).create(
        block.block_type(_client_type(3)))
    assert blocks.initialize.type_signature.result.is_equivalent_to(
        per_client.initialize.type_signature.result)
    assert blocks.next.type_signature.result.state.is_equivalent_to(
        per_client.next.type_signature.result.state)
    assert blocks.next.type_signature.result.result.is_equivalent_to(
        per_client.next.type_signature.result.result)
    _assert_same(blocks.initialize(), per_client.initialize())

  def test_noiseless_rounds_equal_per_client_rounds(self):
    """Three rounds (adaptive clips move, a category frozen in the last): update, state,
    measurements and clip norms equal those of the per-client process; 10 clients in blocks of
    4, the last one partial."""
    clients_per_block = 4
    rng = np.random.default_rng(4)
    num_clients, size = 10, 5
    queries = _noiseless_queries(float(num_clients))
    per_client = _per_client_process(queries, size)
    blocks = block.BlockClassAwareFactory(queries, clients_per_block, WEIGHTS).create(
        block.block_type(_client_type(size)))
    state_a, state_b = per_client.initialize(), blocks.initialize()
    for round_num in range(3):
      # Norms from 0.05 to 3: some clients clipped, some not, zero rows among them.
      w = rng.normal(size=(num_clients, 6, size)) * rng.uniform(0.02, 1.2, (num_clients, 6, 1))
      b = rng.normal(size=(num_clients, 6, 2)) * 0.1
      w[:4, 1:] = 0.0  # Zero sub-updates, not sent: a first block of 4 with no row of them.
      b[:4, 1:] = 0.0
      if round_num == 2:
        state_a = class_aware.with_released_categories(state_a, ['HeadCT', 'CXR', 'Hand'])
        state_b = class_aware.with_released_categories(state_b, ['HeadCT', 'CXR', 'Hand'])
      values = _client_values(w, b)
      out_a = per_client.next(state_a, values)
      out_b = blocks.next(state_b, block.pack(values, clients_per_block))
      _assert_same(out_b.result, out_a.result)
      _assert_same(out_b.state, out_a.state)
      _assert_same(out_b.measurements, out_a.measurements)
      state_a, state_b = out_a.state, out_b.state
      norms_a, norms_b = class_aware.clip_norms(state_a), class_aware.clip_norms(state_b)
      assert norms_a == pytest.approx(norms_b, rel=1e-5)
      if round_num == 0:  # Every clip moved: the comparison saw the adaptive updates.
        assert all(abs(norms_b[c] - (0.3 + 0.4 * i)) > 1e-3 for i, c in enumerate(CATS))
    assert class_aware.released_categories(state_b) == ('HeadCT', 'CXR', 'Hand')

  def test_dp_events_equal_per_client_events(self):
    """With the calibrated noise: the ledger's DP events, frozen categories included."""
    splits = {c: calibration.adaptive_clip_split(1.0 + i, 6.0, 3.0 * (1.0 + i))
              for i, c in enumerate(CATS)}
    per_client = class_aware.ClassAwareFactory.dp(splits).create(_client_type(2))
    blocks = block.BlockClassAwareFactory.dp(splits, clients_per_block=4).create(
        block.block_type(_client_type(2)))
    rng = np.random.default_rng(5)
    values = _client_values(rng.normal(size=(6, 6, 2)), rng.normal(size=(6, 6, 2)))
    for released in (CATS, ('BreastMRI', 'Hand')):
      state_a = class_aware.with_released_categories(per_client.initialize(), released)
      state_b = class_aware.with_released_categories(blocks.initialize(), released)
      events_a = class_aware.dp_events(per_client.next(state_a, values).state)
      events_b = class_aware.dp_events(blocks.next(state_b, block.pack(values, 4)).state)
      assert [c for c in CATS if events_b[c] is not None] == list(released)
      assert events_b == events_a

  @pytest.mark.parametrize('category', ['HeadCT', 'Hand'])
  def test_released_noise_has_the_per_client_stddev(self, category):
    """All updates zero: the block path's release is pure noise of std z_value*C/m, the figure
    test_class_aware checks for the per-client path (seeds of TFF's noise cannot be aligned)."""
    size, num_clients, m = 20000, 5, 8.0
    z = {c: z for c, z in zip(CATS, [7.9, 7.9, 4.3, 4.3, 2.4, 2.4])}
    count_stddev = {c: 3.0 * z[c] for c in CATS}
    splits = {c: calibration.adaptive_clip_split(z[c], m, count_stddev[c]) for c in CATS}
    clip = class_aware.AdaptiveClipSettings(initial_l2_norm_clip=0.5)
    process = block.BlockClassAwareFactory.dp(splits, clip, clients_per_block=2).create(
        block.block_type(_client_type(size)))
    state = class_aware.with_released_categories(process.initialize(), [category])
    zeros = np.zeros((num_clients, 6, size))
    output = process.next(state, block.pack(_client_values(zeros, zeros[..., :2]), 2))
    noise = np.asarray(output.result['w'], np.float64)
    value_z = (z[category]**-2 - count_stddev[category]**-2)**-0.5
    assert_gaussian_noise(noise, value_z * clip.initial_l2_norm_clip / m)


# --- The learning process -----------------------------------------------------------------------


def _tiny_model():
  from tff_medical.models import cnn  # pylint: disable=g-import-not-at-top
  return cnn.build_cnn((2,), seed=0, input_pooling=8, head='gap')


def test_process_refuses_mismatched_block_settings():
  from tff_medical.training import process  # pylint: disable=g-import-not-at-top
  optimizer = tff.learning.optimizers.build_sgdm(1.0)
  blocks = block.BlockClassAwareFactory(_noiseless_queries(4.0), 4)
  with pytest.raises(PolicyError, match='clients_per_block must be given exactly with'):
    process.build_class_aware_process(_tiny_model, blocks, optimizer)
  with pytest.raises(PolicyError, match='clients_per_block must be given exactly with'):
    process.build_class_aware_process(_tiny_model, blocks, optimizer, clients_per_block=8)
  with pytest.raises(PolicyError, match='clients_per_block must be given exactly with'):
    process.build_class_aware_process(_tiny_model, class_aware.ClassAwareFactory.non_private(),
                                      optimizer, clients_per_block=4)


@pytest.mark.usefixtures('tff_context')
def test_block_learning_process_equals_per_client_process():
  """A noiseless round of the whole learning process: same new model and aggregator state."""
  from tff_medical.training import process  # pylint: disable=g-import-not-at-top
  num_clients = 9
  queries = _noiseless_queries(float(num_clients))
  factories = collections.OrderedDict(
      (c, tff.aggregators.DifferentiallyPrivateFactory(q)) for c, q in queries.items())
  optimizer = tff.learning.optimizers.build_sgdm(1.0)
  per_client = process.build_class_aware_process(
      _tiny_model, class_aware.ClassAwareFactory(factories, WEIGHTS, is_dp=True), optimizer)
  blocks = process.build_class_aware_process(
      _tiny_model, block.BlockClassAwareFactory(queries, 4, WEIGHTS), optimizer,
      clients_per_block=4)
  shapes = [w.shape for w in _tiny_model().trainable_weights]
  rng = np.random.default_rng(7)
  structs = []
  for k in range(num_clients):  # One image a client: one category's sub-update is not zero.
    hot = k % 6
    structs.append(process.as_sub_update_structs(
        [[rng.normal(size=s).astype(np.float32) * 0.3 if i == hot else np.zeros(s, np.float32)
          for s in shapes] for i in range(6)]))
  out_a = per_client.next(per_client.initialize(), process.client_values(structs, None))
  out_b = blocks.next(blocks.initialize(), process.client_values(structs, 4))
  assert len(process.client_values(structs, 4)) == 3
  _assert_same(out_b.state.global_model_weights.trainable,
               out_a.state.global_model_weights.trainable)
  _assert_same(out_b.state.aggregator, out_a.state.aggregator)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
      out_b.state.global_model_weights.trainable,
      per_client.initialize().global_model_weights.trainable)]
  assert max(moved) > 1e-4
