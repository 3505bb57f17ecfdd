"""Partitions: deterministic, disjoint and complete, skewed as claimed, and faithful as tf.data."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tff_medical import categories
from tff_medical.data import client_data as client_data_lib
from tff_medical.data import partition as partition_lib
from tff_medical.data import source
from tff_medical.errors import ConfigError
from tff_medical.errors import DataError

IID = partition_lib.PartitionScheme.IID
DIRICHLET = partition_lib.PartitionScheme.DIRICHLET
TRAIN = partition_lib.Split.TRAIN
HOLDOUT = partition_lib.Split.HOLDOUT
C = categories.NUM_CATEGORIES


def _labels(counts=(120, 80, 200, 60, 150, 90), seed=0):
  labels = np.repeat(np.arange(C), counts).astype(np.int32)
  return np.random.default_rng(seed).permutation(labels)


def _images(labels, seed=0):
  pixels = np.random.default_rng(seed).integers(0, 256, (labels.shape[0], 64, 64), np.uint8)
  return source.LabeledImages(pixels, labels, source.LoadReport(source='test'))


def _round_half_up(x):
  return np.floor(np.asarray(x, float) + 0.5).astype(int)


def _owner_of_every_example(p):
  """-1 for test, else the client's position; raises if an example is held twice."""
  owner = np.full(p.num_source_examples, -2)
  held = np.zeros(p.num_source_examples, int)
  held[p.test_indices] += 1
  owner[p.test_indices] = -1
  for i, cid in enumerate(p.client_ids):
    for split in partition_lib.Split:
      rows = p.indices(cid, split)
      held[rows] += 1
      owner[rows] = i
  assert held.max() == 1, 'an example is held twice'
  return owner


# Settings that exercise every code path: both schemes, size skew, no test / no holdout.
_SETTINGS = {
    'iid': dict(scheme=IID),
    'iid_skewed': dict(scheme=IID, size_skew=1.0),
    'dirichlet': dict(scheme=DIRICHLET, alpha=0.5),
    'dirichlet_sparse_skewed': dict(scheme=DIRICHLET, alpha=0.05, size_skew=1.5),
    'no_test_no_holdout': dict(scheme=DIRICHLET, alpha=1.0, test_fraction=0.0,
                               holdout_fraction=0.0),
}


@pytest.mark.parametrize('settings', _SETTINGS.values(), ids=_SETTINGS.keys())
def test_same_seed_same_partition_other_seed_another(settings):
  labels = _labels()
  a = partition_lib.partition(labels, 40, seed=7, **settings)
  b = partition_lib.partition(labels, 40, seed=7, **settings)
  c = partition_lib.partition(labels, 40, seed=8, **settings)
  assert a.manifest() == b.manifest()
  assert a.fingerprint() == b.fingerprint()
  assert a.fingerprint() != c.fingerprint()
  moved = [not np.array_equal(a.train_indices(cid), c.train_indices(cid)) for cid in a.client_ids]
  assert sum(moved) > len(moved) // 2


@pytest.mark.parametrize('settings', _SETTINGS.values(), ids=_SETTINGS.keys())
def test_every_example_in_exactly_one_place(settings):
  labels = _labels()
  p = partition_lib.partition(labels, 40, seed=3, **settings)
  owner = _owner_of_every_example(p)
  assert (owner >= -1).all(), 'an example is in no split'
  # The stored per-client category counts are those of the examples held.
  for cid in p.client_ids[:10]:
    for split in partition_lib.Split:
      expected = np.bincount(labels[p.indices(cid, split)], minlength=C)
      np.testing.assert_array_equal(p.category_counts(cid, split), expected)
  np.testing.assert_array_equal(p.category_count_matrix().sum(axis=0) +
                                np.bincount(labels[p.test_indices], minlength=C),
                                np.bincount(labels, minlength=C))


@pytest.mark.parametrize('settings', _SETTINGS.values(), ids=_SETTINGS.keys())
def test_every_client_trains_and_holds_out_its_share(settings):
  p = partition_lib.partition(_labels(), 40, seed=5, **settings)
  total = p.num_examples()
  train, holdout = p.num_examples(TRAIN), p.num_examples(HOLDOUT)
  assert train.min() >= 1
  fraction = settings.get('holdout_fraction', 0.1)
  np.testing.assert_array_equal(holdout,
                                np.minimum(_round_half_up(fraction * total), total - 1))
  np.testing.assert_array_equal(train + holdout, total)


def test_one_example_per_client_when_clients_equal_examples():
  labels = _labels((5, 5, 5, 5, 5, 5))
  p = partition_lib.partition(labels, 30, DIRICHLET, alpha=0.1, test_fraction=0.0,
                              holdout_fraction=0.5)
  np.testing.assert_array_equal(p.num_examples(TRAIN), np.ones(30))
  np.testing.assert_array_equal(p.num_examples(HOLDOUT), np.zeros(30))


def test_test_split_is_stratified():
  counts = (120, 80, 200, 7, 0, 15)  # One category absent, some too small for exact shares.
  labels = _labels(counts)
  for fraction in (0.1, 0.25, 0.5):
    p = partition_lib.partition(labels, 10, IID, test_fraction=fraction)
    np.testing.assert_array_equal(np.bincount(labels[p.test_indices], minlength=C),
                                  _round_half_up(np.array(counts) * fraction))
    assert np.all(np.diff(p.test_indices) > 0)


def test_test_split_does_not_depend_on_how_clients_are_made():
  labels = _labels()
  reference = partition_lib.partition(labels, 10, IID, seed=4).test_indices
  for settings in _SETTINGS.values():
    if settings.get('test_fraction', 0.1) == 0.1:
      p = partition_lib.partition(labels, 33, seed=4, **settings)
      np.testing.assert_array_equal(p.test_indices, reference)


def _label_shares(p):
  counts = p.category_count_matrix().astype(float)
  return counts / counts.sum(axis=1, keepdims=True)


def test_dirichlet_concentrates_labels_as_alpha_says():
  labels = _labels((1000,) * C)
  mean_max_share = {}
  for name, scheme, alpha in (('iid', IID, 0.5), ('0.1', DIRICHLET, 0.1),
                              ('1', DIRICHLET, 1.0), ('100', DIRICHLET, 100.0)):
    values = [_label_shares(partition_lib.partition(labels, 50, scheme, alpha=alpha,
                                                    seed=s)).max(axis=1).mean()
              for s in range(3)]
    mean_max_share[name] = float(np.mean(values))
  # 108 examples per client: IID gives about 0.22 (1/6 plus sampling noise).
  assert 0.18 < mean_max_share['iid'] < 0.26
  assert mean_max_share['0.1'] > 0.65
  assert mean_max_share['0.1'] > mean_max_share['1'] + 0.2 > mean_max_share['iid'] + 0.3
  assert abs(mean_max_share['100'] - mean_max_share['iid']) < 0.05


@pytest.mark.parametrize('alpha', [0.1, 1.0], ids=['alpha_0.1', 'alpha_1'])
def test_dirichlet_client_shares_have_the_dirichlet_variance(alpha):
  # Each category's client shares are Dir_K(alpha): Var = (1/K)(1 - 1/K) / (K * alpha + 1).
  num_clients = 100
  labels = _labels((3000,) * C)
  expected = (1 / num_clients) * (1 - 1 / num_clients) / (num_clients * alpha + 1)
  ratios = []
  for seed in range(8):
    p = partition_lib.partition(labels, num_clients, DIRICHLET, alpha=alpha, seed=seed,
                                test_fraction=0.0, holdout_fraction=0.0)
    counts = p.category_count_matrix().astype(float)
    shares = counts / counts.sum(axis=0, keepdims=True)
    ratios.append(np.mean((shares - 1 / num_clients)**2) / expected)
  # 48 category draws of 100 clients: the mean ratio is within a few percent of 1.
  assert 0.8 < np.mean(ratios) < 1.2, ratios


def test_size_skew_makes_client_sizes_uneven():
  labels = _labels((1000,) * C)

  def variation(sizes):
    return sizes.std() / sizes.mean()

  equal = partition_lib.partition(labels, 50, IID).num_examples()
  assert equal.max() - equal.min() <= 1
  near_iid = partition_lib.partition(labels, 50, DIRICHLET, alpha=100.0).num_examples()
  assert variation(near_iid) < 0.15
  for scheme in (IID, DIRICHLET):
    skewed = partition_lib.partition(labels, 50, scheme, alpha=100.0, size_skew=1.0)
    sizes = skewed.num_examples()
    assert variation(sizes) > 0.5
    assert sizes.min() >= 1 and sizes.sum() == labels.shape[0] - skewed.test_indices.shape[0]


def test_scheme_accepts_its_value_and_iid_records_no_alpha():
  p = partition_lib.partition(_labels(), 5, 'iid', alpha=3.0)
  assert p.scheme is IID and p.alpha is None and p.manifest()['alpha'] is None
  assert partition_lib.partition(_labels(), 5, 'dirichlet').alpha == 0.5


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(num_clients=-1), ConfigError, 'num_clients must be positive. Found -1.'),
    (dict(num_clients=0), ConfigError, 'num_clients must be positive. Found 0.'),
    (dict(num_clients=2.0), ConfigError, 'num_clients must be positive. Found 2.0.'),
    (dict(num_clients=True), ConfigError, 'num_clients must be positive. Found True.'),
    (dict(num_clients=631), ConfigError,
     'num_clients must be at most the 630 examples left after the test split '
     '(every client needs one). Found 631.'),
    (dict(scheme='noniid'), ConfigError, "scheme must be one of iid, dirichlet. Found 'noniid'."),
    (dict(alpha=0.0), ConfigError, 'alpha must be positive. Found 0.0.'),
    (dict(alpha=float('inf')), ConfigError, 'alpha must be positive. Found inf.'),
    (dict(seed=-3), ConfigError, 'seed must be a non-negative integer. Found -3.'),
    (dict(test_fraction=1.0), ConfigError, 'test_fraction must be in [0, 1). Found 1.0.'),
    (dict(test_fraction=-0.1), ConfigError, 'test_fraction must be in [0, 1). Found -0.1.'),
    (dict(holdout_fraction=float('nan')), ConfigError,
     'holdout_fraction must be in [0, 1). Found nan.'),
    (dict(size_skew=-1.0), ConfigError, 'size_skew must be non-negative. Found -1.0.'),
    (dict(source_fingerprint=''), ConfigError,
     "source_fingerprint must be a non-empty string. Found ''."),
    (dict(labels=np.array([0, 1, 6])), DataError, 'labels must be in [0, 6). Found 0..6.'),
    (dict(labels=np.array([0, -1])), DataError, 'labels must be in [0, 6). Found -1..0.'),
    (dict(labels=np.array([0.0, 1.0])), DataError,
     'labels must be a non-empty 1-D integer array. Found float64 (2,).'),
    (dict(labels=np.zeros((2, 2), int)), DataError,
     'labels must be a non-empty 1-D integer array. Found int64 (2, 2).'),
    (dict(labels=np.zeros(0, int)), DataError,
     'labels must be a non-empty 1-D integer array. Found int64 (0,).'),
], ids=['clients_negative', 'clients_zero', 'clients_float', 'clients_bool', 'too_many_clients',
        'unknown_scheme', 'alpha_zero', 'alpha_inf', 'seed_negative', 'test_fraction_one',
        'test_fraction_negative', 'holdout_nan', 'size_skew_negative', 'fingerprint_empty',
        'label_too_large', 'label_negative', 'labels_float', 'labels_2d', 'labels_empty'])
def test_bad_arguments_are_refused(kwargs, error, message):
  args = dict(labels=_labels((120, 80, 200, 60, 150, 90)), num_clients=10, scheme=DIRICHLET)
  args.update(kwargs)
  with pytest.raises(error) as raised:
    partition_lib.partition(**args)
  assert str(raised.value) == message


def test_manifest_round_trip_through_a_file(tmp_path):
  p = partition_lib.partition(_labels(), 25, DIRICHLET, alpha=0.3, seed=2, size_skew=0.5)
  path = tmp_path / 'partition.json'
  path.write_text('old content')
  p.save_manifest(path)
  assert os.listdir(tmp_path) == ['partition.json']  # Replaced in place, no temp file left.
  with open(path) as f:
    raw = json.load(f)
  assert raw == p.manifest()
  q = partition_lib.load_manifest(path)
  assert q.fingerprint() == p.fingerprint() and q == p
  assert q.client_ids == p.client_ids
  for cid in p.client_ids:
    for split in partition_lib.Split:
      np.testing.assert_array_equal(q.indices(cid, split), p.indices(cid, split))
      np.testing.assert_array_equal(q.category_counts(cid, split), p.category_counts(cid, split))
  np.testing.assert_array_equal(q.test_indices, p.test_indices)
  for field in ('scheme', 'alpha', 'seed', 'test_fraction', 'holdout_fraction', 'size_skew',
                'num_source_examples', 'source_fingerprint'):
    assert getattr(q, field) == getattr(p, field)


def test_manifest_holds_ids_and_settings_only():
  labels = _labels()
  p = partition_lib.partition(labels, 4, IID, seed=1)
  m = p.manifest()
  assert set(m) == {'format', 'scheme', 'alpha', 'seed', 'num_clients', 'test_fraction',
                    'holdout_fraction', 'size_skew', 'num_source_examples',
                    'source_fingerprint', 'clients', 'test'}
  assert m['source_fingerprint'] == partition_lib.labels_fingerprint(labels)
  assert list(m['clients']) == ['client_00000', 'client_00001', 'client_00002', 'client_00003']
  entry = m['clients']['client_00002']
  assert set(entry) == {'train', 'holdout', 'category_counts', 'train_category_counts'}
  assert entry['train'] == p.train_indices('client_00002').tolist()
  assert list(entry['category_counts']) == list(categories.CATEGORY_IDS)
  json.dumps(m, allow_nan=False)  # JSON-able as is.


def test_fingerprint_is_stable_and_sees_every_change():
  labels = _labels()
  p = partition_lib.partition(labels, 20, DIRICHLET, alpha=0.5, seed=0)
  fingerprint = p.fingerprint()
  assert len(fingerprint) == 64
  assert partition_lib.Partition.from_manifest(json.loads(json.dumps(p.manifest()))
                                              ).fingerprint() == fingerprint
  # Move one example from one client's train split to another's.
  m = p.manifest()
  a, b = m['clients']['client_00000'], m['clients']['client_00001']
  moved = a['train'].pop()
  b['train'].append(moved)
  category = categories.CATEGORY_IDS[labels[moved]]
  for counts in ('category_counts', 'train_category_counts'):
    a[counts][category] -= 1
    b[counts][category] += 1
  assert partition_lib.Partition.from_manifest(m).fingerprint() != fingerprint
  other_source = partition_lib.partition(labels, 20, DIRICHLET, alpha=0.5, seed=0,
                                         source_fingerprint='another source')
  assert other_source.fingerprint() != fingerprint


def _break(fn):
  def mutate(m):
    fn(m)
    return m
  return mutate


@pytest.mark.parametrize('mutate, message', [
    (_break(lambda m: m.pop('test')), 'missing test.'),
    (_break(lambda m: m.update(format='other/2')), "format must be 'tff_medical.partition/1'"),
    (_break(lambda m: m.update(scheme='random')), "unknown scheme 'random'."),
    (_break(lambda m: m.update(alpha=0.5)), "alpha 0.5 does not fit scheme 'iid'."),
    (_break(lambda m: m['test'].append(m['test'][0])), 'exactly once'),
    (_break(lambda m: m['test'].pop()), 'exactly once'),
    (_break(lambda m: m['clients']['client_00001']['holdout'].append(10**6)), 'exactly once'),
    (_break(lambda m: m['clients']['client_00001'].update(train=[])),
     "client 'client_00001' has no train example."),
    (_break(lambda m: m['clients']['client_00001']['train'].append(0.5)),
     'train example ids must be a list of integers.'),
    (_break(lambda m: m['clients']['client_00002']['category_counts'].pop('CXR')),
     'client_00002.category_counts must map each of'),
    (_break(lambda m: m['clients']['client_00002']['train_category_counts'].update(CXR=999)),
     'category counts do not add up to the train lists.'),
    (_break(lambda m: m.update(num_clients=3)), 'num_clients is 3 but 4 clients are listed.'),
], ids=['no_test', 'format', 'scheme', 'alpha_for_iid', 'duplicate', 'missing_example',
        'out_of_range', 'empty_client', 'float_id', 'counts_keys', 'counts_sum', 'num_clients'])
def test_broken_manifests_are_refused(mutate, message):
  m = mutate(partition_lib.partition(_labels(), 4, IID, seed=1).manifest())
  with pytest.raises(DataError, match='^Not a valid partition manifest: ') as raised:
    partition_lib.Partition.from_manifest(m)
  assert message in str(raised.value)


def test_unknown_client_id_is_refused():
  p = partition_lib.partition(_labels(), 4, IID)
  with pytest.raises(DataError, match="Found 'client_00004'"):
    p.train_indices('client_00004')
  with pytest.raises(ConfigError, match="split must be one of train, holdout. Found 'test'."):
    p.indices('client_00000', 'test')


def test_partition_arrays_are_read_only():
  p = partition_lib.partition(_labels(), 4, IID)
  with pytest.raises(ValueError):
    p.train_indices('client_00000')[0] = 1
  with pytest.raises(ValueError):
    p.test_indices[0] = 1


def _elements(dataset):
  pairs = list(dataset.as_numpy_iterator())
  xs = np.stack([x for x, _ in pairs]) if pairs else np.zeros((0, 64, 64, 1), np.float32)
  return xs, np.array([y for _, y in pairs], np.int32)


@pytest.mark.parametrize('split', list(partition_lib.Split), ids=lambda s: s.value)
def test_client_data_yields_exactly_each_clients_examples(split):
  labels = _labels()
  images = _images(labels)
  p = partition_lib.partition(labels, 30, DIRICHLET, alpha=0.5, seed=1)
  data = client_data_lib.make_client_data(images, p, split)
  assert data.element_type_structure == (tf.TensorSpec((64, 64, 1), tf.float32),
                                         tf.TensorSpec((), tf.int32))
  expected_ids = [cid for cid in p.client_ids if p.indices(cid, split).size]
  assert data.client_ids == expected_ids
  for cid in expected_ids[:5] + expected_ids[-2:]:
    rows = p.indices(cid, split)
    xs, ys = _elements(data.create_tf_dataset_for_client(cid))
    np.testing.assert_array_equal(ys, labels[rows])
    np.testing.assert_array_equal(xs[..., 0], images.images[rows].astype(np.float32) / 255)
    assert xs.min() >= 0.0 and xs.max() <= 1.0


def test_all_clients_dataset_uses_the_same_examples():
  # create_tf_dataset_from_all_clients traces the dataset function with a string tensor.
  labels = _labels()
  images = _images(labels)
  p = partition_lib.partition(labels, 12, IID, seed=1)
  data = client_data_lib.make_client_data(images, p)
  order = list(data.client_ids)
  np.random.RandomState(3).shuffle(order)
  expected = [_elements(data.create_tf_dataset_for_client(cid)) for cid in order]
  xs, ys = _elements(data.create_tf_dataset_from_all_clients(seed=3))
  np.testing.assert_array_equal(ys, np.concatenate([y for _, y in expected]))
  np.testing.assert_array_equal(xs, np.concatenate([x for x, _ in expected]))


def test_client_data_refuses_other_images():
  labels = _labels()
  p = partition_lib.partition(labels, 10, IID)
  with pytest.raises(DataError, match='must have the partition\'s 700 examples. Found 699.'):
    client_data_lib.make_client_data(_images(labels[:-1]), p)
  with pytest.raises(DataError, match='not the partition\'s source'):
    client_data_lib.make_client_data(_images(np.random.default_rng(9).permutation(labels)), p)


def test_client_data_with_no_holdout_is_refused():
  labels = _labels()
  p = partition_lib.partition(labels, 10, IID, holdout_fraction=0.0)
  with pytest.raises(DataError, match='No client has a holdout example'):
    client_data_lib.make_client_data(_images(labels), p, 'holdout')


def test_central_dataset_batches_the_given_examples_in_order():
  labels = _labels()
  images = _images(labels)
  p = partition_lib.partition(labels, 10, IID)
  dataset = client_data_lib.central_dataset(images, p.test_indices, batch_size=32)
  batches = list(dataset.as_numpy_iterator())
  assert [y.shape[0] for _, y in batches] == [32, 32, 6]
  xs = np.concatenate([x for x, _ in batches])
  np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels[p.test_indices])
  np.testing.assert_array_equal(xs[..., 0],
                                images.images[p.test_indices].astype(np.float32) / 255)
  with pytest.raises(DataError, match=r'indices must be in \[0, 700\). Found 0..700.'):
    client_data_lib.central_dataset(images, [0, 700])
  with pytest.raises(ConfigError, match='batch_size must be a positive integer. Found 0.'):
    client_data_lib.central_dataset(images, [0], batch_size=0)


def test_preprocess_shuffles_each_epoch_and_batches():
  labels = _labels()
  images = _images(labels)
  p = partition_lib.partition(labels, 10, IID)
  cid = p.client_ids[0]
  data = client_data_lib.make_client_data(images, p)
  n = p.num_examples(TRAIN)[0]  # 57 examples
  xs, _ = _elements(data.create_tf_dataset_for_client(cid))
  stream = client_data_lib.preprocess(data.create_tf_dataset_for_client(cid), batch_size=10,
                                      epochs=3, shuffle_seed=11)
  batches = list(stream.as_numpy_iterator())
  assert [y.shape[0] for _, y in batches] == [10] * (3 * n // 10) + [3 * n % 10]
  seen = np.concatenate([x for x, _ in batches])
  # Examples are told apart by their pixels: map each element back to its position.
  key = {x.tobytes(): i for i, x in enumerate(xs)}
  positions = np.array([key[x.tobytes()] for x in seen])
  epochs = positions.reshape(3, n)
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))  # Every epoch is one full pass.
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled between epochs.
  assert not np.array_equal(epochs[0], np.arange(n))  # Shuffled at all.
  again = np.concatenate([x for x, _ in client_data_lib.preprocess(
      data.create_tf_dataset_for_client(cid), 10, 3, shuffle_seed=11).as_numpy_iterator()])
  np.testing.assert_array_equal(again, seen)


@pytest.mark.parametrize('kwargs, message', [
    (dict(batch_size=0), 'batch_size must be a positive integer. Found 0.'),
    (dict(epochs=0), 'epochs must be a positive integer. Found 0.'),
    (dict(epochs=1.5), 'epochs must be a positive integer. Found 1.5.'),
    (dict(shuffle_seed=-1), 'shuffle_seed must be a non-negative integer or None. Found -1.'),
], ids=['batch_zero', 'epochs_zero', 'epochs_float', 'seed_negative'])
def test_preprocess_refuses_bad_arguments(kwargs, message):
  args = dict(batch_size=4, epochs=1, shuffle_seed=None)
  args.update(kwargs)
  with pytest.raises(ConfigError) as raised:
    client_data_lib.preprocess(tf.data.Dataset.range(3), **args)
  assert str(raised.value) == message


def test_client_datasets_run_in_tff(tff_context):
  """A TFF computation sees the client's exact examples, both as a passed dataset and via
  dataset_computation (the traced path)."""
  del tff_context
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  labels = _labels()
  images = _images(labels)
  p = partition_lib.partition(labels, 10, DIRICHLET, alpha=0.5, seed=4)
  data = client_data_lib.make_client_data(images, p)

  @tff.tensorflow.computation(
      tff.SequenceType((tff.TensorType(np.float32, [64, 64, 1]), tff.TensorType(np.int32))))
  def label_and_pixel_sums(dataset):
    return dataset.reduce(
        (tf.constant(0, tf.int64), tf.constant(0.0, tf.float64)),
        lambda s, e: (s[0] + tf.cast(e[1], tf.int64),
                      s[1] + tf.reduce_sum(tf.cast(e[0], tf.float64))))

  cid = data.client_ids[2]
  rows = p.train_indices(cid)
  label_sum, pixel_sum = label_and_pixel_sums(data.create_tf_dataset_for_client(cid))
  assert label_sum == labels[rows].sum()
  np.testing.assert_allclose(pixel_sum, images.images[rows].sum() / 255, rtol=1e-6)
  xs, ys = _elements(data.dataset_computation(cid))
  np.testing.assert_array_equal(ys, labels[rows])
  np.testing.assert_array_equal(xs[..., 0], images.images[rows].astype(np.float32) / 255)


def test_59000_clients_over_59000_examples():
  # Timings are measured in the report; here only correctness at that scale is asserted.
  n = 59_000
  labels = np.random.default_rng(0).integers(0, C, n).astype(np.int32)
  p = partition_lib.partition(labels, n, DIRICHLET, alpha=0.5, seed=0, test_fraction=0.0)
  assert p.num_clients == n and p.client_ids[-1] == 'client_58999'
  np.testing.assert_array_equal(p.num_examples(TRAIN), np.ones(n))
  np.testing.assert_array_equal(p.num_examples(HOLDOUT), np.zeros(n))
  train_index, offsets = p.csr(TRAIN)
  np.testing.assert_array_equal(np.sort(train_index), np.arange(n))
  np.testing.assert_array_equal(offsets, np.arange(n + 1))
  np.testing.assert_array_equal(p.category_count_matrix().sum(axis=0),
                                np.bincount(labels, minlength=C))
  assert partition_lib.Partition.from_manifest(p.manifest()).fingerprint() == p.fingerprint()
  with pytest.raises(ConfigError, match='at most the 53100 examples left'):
    partition_lib.partition(labels, n, IID, test_fraction=0.1)

  # Zero pixels are never touched except for the clients asked for: no 240 MB written here.
  images = source.LabeledImages(np.zeros((n, 64, 64), np.uint8), labels,
                                source.LoadReport(source='test'))
  data = client_data_lib.make_client_data(images, p)
  assert len(data.client_ids) == n
  cid = 'client_31415'
  xs, ys = _elements(data.create_tf_dataset_for_client(cid))
  assert xs.shape == (1, 64, 64, 1)
  np.testing.assert_array_equal(ys, labels[p.train_indices(cid)])
