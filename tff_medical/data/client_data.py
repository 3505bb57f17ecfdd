"""tf.data views of a partitioned source: per-client `ClientData`, central evaluation data.

Element format and memory (TFF's serialization cap): docs/DESIGN.md.
"""

from typing import Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_medical import categories
from tff_medical.data import model_input
from tff_medical.data import partition as partition_lib
from tff_medical.data import source
from tff_medical.errors import ConfigError
from tff_medical.errors import DataError

_SIZE = categories.IMAGE_SIZE
# Used when a dataset's size is unknown; client datasets built here always know theirs.
_DEFAULT_SHUFFLE_BUFFER = 10_000


def _to_model_input(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """uint8 (..., 64, 64) -> float32 (..., 64, 64, 1) in [0, 1]; works on single and batched."""
  return model_input.to_model_input(x), tf.cast(y, tf.int32)


# A tf.function so that the map is traced once per process, not once per client (about 15 ms
# each time); a call then costs well under a millisecond. uint8 goes into the dataset and float
# comes out of the map: a quarter of the bytes when TFF serializes it.
@tf.function(input_signature=[
    tf.TensorSpec((None, _SIZE, _SIZE), tf.uint8),
    tf.TensorSpec((None,), tf.int32),
])
def _dataset_from_arrays(pixels: tf.Tensor, labels: tf.Tensor) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensor_slices((pixels, labels)).map(_to_model_input)


class _ClientDatasetFn:
  """client_id -> tf.data.Dataset of one client's split; holds no per-client data."""

  def __init__(self, images: source.LabeledImages, partition: partition_lib.Partition,
               split: partition_lib.Split):
    self._pixels = images.images
    self._labels = images.labels
    self._partition = partition
    self._split = split
    self._tensors = None  # Built on first traced call only.

  def __call__(self, client_id) -> tf.data.Dataset:
    if isinstance(client_id, bytes):
      client_id = client_id.decode('utf-8')
    if isinstance(client_id, str):
      rows = self._partition.indices(client_id, self._split)
      return _dataset_from_arrays(self._pixels[rows], self._labels[rows])
    return self._traced(client_id)

  def _shared_tensors(self):
    if self._tensors is None:
      index, offsets = self._partition.csr(self._split)
      keys = tf.constant(self._partition.client_ids)
      positions = tf.range(self._partition.num_clients, dtype=tf.int64)
      self._tensors = (
          tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, positions), -1),
          tf.constant(offsets, tf.int64),
          tf.constant(index, tf.int64),
          tf.constant(self._pixels),
          tf.constant(self._labels),
      )
    return self._tensors

  def _traced(self, client_id: tf.Tensor) -> tf.data.Dataset:
    # Eager constants, built once and captured by every trace. tf.data captures them by
    # reference; a TFF computation (`dataset_computation`) embeds them, so that one holds a
    # copy of the whole source: fine for small sources, wasteful for large ones.
    with tf.init_scope():
      table, offsets, index, pixels, labels = self._shared_tensors()
    position = table.lookup(tf.convert_to_tensor(client_id, tf.string))
    check = tf.debugging.assert_non_negative(position, message='Unknown client id.')
    with tf.control_dependencies([check]):
      rows = index[offsets[position]:offsets[position + 1]]
    return tf.data.Dataset.from_tensor_slices(rows).map(
        lambda row: _to_model_input(tf.gather(pixels, row), tf.gather(labels, row)))


def make_client_data(
    images: source.LabeledImages,
    partition: partition_lib.Partition,
    split: Union[partition_lib.Split, str] = partition_lib.Split.TRAIN,
) -> tff.simulation.datasets.ClientData:
  """One ClientData over the partition's clients, for one local split.

  Args:
    images: the source the partition was made from (checked by per-client category counts).
    partition: a `Partition` of `images`.
    split: `Split.TRAIN` or `Split.HOLDOUT` (or 'train' / 'holdout').

  Returns:
    A ClientData whose client_ids are the partition's clients with at least one example in the
    split (all of them for TRAIN; clients too small to hold anything out are left out of
    HOLDOUT), each dataset yielding that client's (x, y) in ascending example id order.
  """
  split = partition_lib.as_split(split)
  partition.check_source(images.labels)
  sizes = partition.num_examples(split)
  client_ids = [cid for cid, n in zip(partition.client_ids, sizes.tolist()) if n]
  if not client_ids:
    raise DataError(f'No client has a {split.value} example (holdout_fraction '
                    f'{partition.holdout_fraction}).')
  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      client_ids, _ClientDatasetFn(images, partition, split))


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ConfigError(f'{name} must be a positive integer. Found {value!r}.')
  return int(value)


def central_dataset(images: source.LabeledImages, indices: np.ndarray,
                    batch_size: int = 256) -> tf.data.Dataset:
  """Batched (x, y) of the given examples, in the given order, e.g. `partition.test_indices`."""
  batch_size = _positive_int('batch_size', batch_size)
  indices = np.asarray(indices)
  if indices.ndim != 1 or (indices.size and indices.dtype.kind not in 'iu'):
    raise DataError(f'indices must be a 1-D integer array. Found {indices.dtype} '
                    f'{indices.shape}.')
  if indices.size and (indices.min() < 0 or indices.max() >= len(images)):
    raise DataError(f'indices must be in [0, {len(images)}). '
                    f'Found {indices.min()}..{indices.max()}.')
  indices = indices.astype(np.int64)
  # Batch first, then convert whole batches: one vectorized cast per batch.
  return tf.data.Dataset.from_tensor_slices(
      (images.images[indices], images.labels[indices])).batch(batch_size).map(_to_model_input)


def preprocess(dataset: tf.data.Dataset, batch_size: int, epochs: int = 1,
               shuffle_seed: Optional[int] = None) -> tf.data.Dataset:
  """A client's local training stream: shuffle, `epochs` passes, batches of `batch_size`.

  The shuffle buffer holds the whole client dataset (a full permutation, reshuffled every
  epoch). With a seed the order is reproducible, and therefore the same every time the dataset
  is rebuilt: inside a federated loop, pass a seed that changes with the round.
  Batches may straddle epochs, as in TFF's examples; the last one may be short.
  Usable directly or as `client_data.preprocess(lambda d: preprocess(d, ...))`.
  """
  batch_size = _positive_int('batch_size', batch_size)
  epochs = _positive_int('epochs', epochs)
  if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or
                                   not isinstance(shuffle_seed, (int, np.integer)) or
                                   shuffle_seed < 0):
    raise ConfigError(f'shuffle_seed must be a non-negative integer or None. '
                      f'Found {shuffle_seed!r}.')
  cardinality = dataset.cardinality()
  buffer_size = tf.where(cardinality > 0, cardinality,
                         tf.constant(_DEFAULT_SHUFFLE_BUFFER, tf.int64))
  return dataset.shuffle(buffer_size, seed=shuffle_seed,
                         reshuffle_each_iteration=True).repeat(epochs).batch(batch_size)
