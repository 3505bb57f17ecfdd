"""Splits a labelled source into a central test set and per-client train / holdout sets.

The stages, their random streams and limits: docs/DESIGN.md.
"""

import enum
import hashlib
import itertools
import json
import math
import numbers
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from tff_medical import fileio
from tff_medical import categories
from tff_medical.errors import parse_enum
from tff_medical.errors import ConfigError
from tff_medical.errors import DataError

MANIFEST_FORMAT = 'tff_medical.partition/1'
_C = categories.NUM_CATEGORIES
# Independent streams of one seed (SeedSequence spawn keys): the test split must not depend on
# how the rest is later shared out.
_TEST_STREAM = 0
_ASSIGN_STREAM = 1
_HOLDOUT_STREAM = 2


class PartitionScheme(enum.Enum):
  IID = 'iid'
  DIRICHLET = 'dirichlet'


class Split(enum.Enum):
  """A client's local split."""

  TRAIN = 'train'
  HOLDOUT = 'holdout'


def labels_fingerprint(labels: np.ndarray) -> str:
  """sha256 (hex) of the number of examples and the labels as little-endian int32."""
  labels = np.asarray(labels)
  digest = hashlib.sha256(f'n={labels.shape[0]};'.encode('ascii'))
  digest.update(labels.astype('<i4').tobytes())
  return digest.hexdigest()


def _as_scheme(scheme: Union[PartitionScheme, str]) -> PartitionScheme:
  return parse_enum(PartitionScheme, scheme, 'scheme', ConfigError)


def as_split(split: Union[Split, str]) -> Split:
  return parse_enum(Split, split, 'split', ConfigError)


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool) and
          math.isfinite(value))


def _check_labels(labels: Any) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] == 0 or labels.dtype.kind not in 'iu':
    raise DataError('labels must be a non-empty 1-D integer array. '
                    f'Found {labels.dtype} {labels.shape}.')
  if labels.min() < 0 or labels.max() >= _C:
    raise DataError(f'labels must be in [0, {_C}). Found {labels.min()}..{labels.max()}.')
  return labels.astype(np.int64)


def _round_half_up(x: np.ndarray) -> np.ndarray:
  return np.floor(x + 0.5).astype(np.int64)


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
  """Integer shares of `total` proportional to `weights` (largest remainder, ties by index)."""
  raw = weights / weights.sum() * total
  shares = np.floor(raw).astype(np.int64)
  rest = total - int(shares.sum())
  fraction = raw - shares
  if rest > 0:
    shares[np.argsort(-fraction, kind='stable')[:rest]] += 1
  elif rest < 0:  # Only float rounding can overshoot, by a unit or so.
    candidates = np.flatnonzero(shares > 0)
    shares[candidates[np.argsort(fraction[candidates], kind='stable')[:-rest]]] -= 1
  return shares


def _rank_within_groups(groups: np.ndarray, num_groups: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A random order of the items grouped by group, and each item's rank inside its group."""
  order = np.lexsort((rng.random(groups.shape[0]), groups))
  sorted_groups = groups[order]
  starts = np.concatenate([[0], np.cumsum(np.bincount(groups, minlength=num_groups))[:-1]])
  rank = np.arange(groups.shape[0]) - starts[sorted_groups]
  return order, rank


def _stratified_test_split(labels: np.ndarray, fraction: float,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  order, rank = _rank_within_groups(labels, _C, rng)
  num_test = _round_half_up(np.bincount(labels, minlength=_C) * fraction)
  is_test = rank < num_test[labels[order]]
  return np.sort(order[is_test]), np.sort(order[~is_test])


def _size_weights(num_clients: int, size_skew: float, rng: np.random.Generator) -> np.ndarray:
  if size_skew == 0:
    return np.full(num_clients, 1.0 / num_clients)
  weights = rng.lognormal(mean=0.0, sigma=size_skew, size=num_clients)
  return weights / weights.sum()


def _assign_iid(pool: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  num_clients = weights.shape[0]
  sizes = 1 + _apportion(pool.shape[0] - num_clients, weights)
  client_of = np.empty(pool.shape[0], np.int64)
  client_of[rng.permutation(pool.shape[0])] = np.repeat(np.arange(num_clients), sizes)
  return client_of


def _assign_dirichlet(pool_labels: np.ndarray, weights: np.ndarray, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
  num_clients = weights.shape[0]
  # Equal weights give every client concentration alpha: the textbook Dir(alpha).
  concentration = alpha * num_clients * weights
  order, _ = _rank_within_groups(pool_labels, _C, rng)
  client_of = np.empty(pool_labels.shape[0], np.int64)
  start = 0
  for count in np.bincount(pool_labels, minlength=_C):
    if count:
      shares = _apportion(int(count), rng.dirichlet(concentration))
      client_of[order[start:start + count]] = np.repeat(np.arange(num_clients), shares)
    start += count
  _fill_empty_clients(client_of, num_clients, rng)
  return client_of


def _fill_empty_clients(client_of: np.ndarray, num_clients: int,
                        rng: np.random.Generator) -> None:
  """Moves one random example from the largest clients to each empty client, in place."""
  sizes = np.bincount(client_of, minlength=num_clients)
  empty = np.flatnonzero(sizes == 0)
  if not empty.size:
    return
  need = empty.size
  # Water-filling from the top: the largest level with enough examples above it. Level 1 always
  # has enough because the pool holds at least num_clients examples.
  def above(level):
    return int(np.maximum(sizes - level, 0).sum())

  low, high = 1, int(sizes.max())
  while low < high:
    mid = (low + high + 1) // 2
    if above(mid) >= need:
      low = mid
    else:
      high = mid - 1
  give = np.maximum(sizes - (low + 1), 0)
  short = need - int(give.sum())
  if short:
    at_level = np.flatnonzero(sizes >= low + 1)
    give[rng.choice(at_level, size=short, replace=False)] += 1
  order, rank = _rank_within_groups(client_of, num_clients, rng)
  donated = order[rank < give[client_of[order]]]
  client_of[rng.permutation(donated)] = empty


def _csr(members: np.ndarray, owners: np.ndarray,
         num_clients: int) -> tuple[np.ndarray, np.ndarray]:
  """Example ids grouped by owner (ascending ids inside a group) and the group offsets."""
  order = np.lexsort((members, owners))
  offsets = np.zeros(num_clients + 1, np.int64)
  np.cumsum(np.bincount(owners, minlength=num_clients), out=offsets[1:])
  return members[order], offsets


def _count_matrix(index: np.ndarray, offsets: np.ndarray, labels: np.ndarray) -> np.ndarray:
  num_clients = offsets.shape[0] - 1
  owners = np.repeat(np.arange(num_clients), np.diff(offsets))
  return np.bincount(owners * _C + labels[index],
                     minlength=num_clients * _C).reshape(num_clients, _C)


def _client_ids(num_clients: int) -> list[str]:
  width = max(5, len(str(num_clients - 1)))
  return [f'client_{i:0{width}d}' for i in range(num_clients)]


class Partition:
  """Who holds which example: immutable index arrays into the source, no pixel data.

  Built by `partition()` or `Partition.from_manifest()`; the constructor is not a public API.
  """

  def __init__(self, *, scheme: PartitionScheme, alpha: Optional[float], seed: int,
               test_fraction: float, holdout_fraction: float, size_skew: float,
               num_source_examples: int, source_fingerprint: str, client_ids: Sequence[str],
               train_index: np.ndarray, train_offsets: np.ndarray, holdout_index: np.ndarray,
               holdout_offsets: np.ndarray, test_index: np.ndarray, train_counts: np.ndarray,
               holdout_counts: np.ndarray):
    self.scheme = scheme
    self.alpha = alpha
    self.seed = seed
    self.test_fraction = test_fraction
    self.holdout_fraction = holdout_fraction
    self.size_skew = size_skew
    self.num_source_examples = num_source_examples
    self.source_fingerprint = source_fingerprint
    self._client_ids = tuple(client_ids)
    self._position = {cid: i for i, cid in enumerate(self._client_ids)}
    self._index = {Split.TRAIN: train_index, Split.HOLDOUT: holdout_index}
    self._offsets = {Split.TRAIN: train_offsets, Split.HOLDOUT: holdout_offsets}
    self._counts = {Split.TRAIN: train_counts, Split.HOLDOUT: holdout_counts}
    self._test_index = test_index
    for array in (train_index, train_offsets, holdout_index, holdout_offsets, test_index,
                  train_counts, holdout_counts):
      array.flags.writeable = False  # Views are handed out; nobody may edit the partition.
    self._fingerprint = None

  @property
  def client_ids(self) -> tuple[str, ...]:
    """Pseudonymous ids in position order; a tuple, so reading it in a loop copies nothing."""
    return self._client_ids

  @property
  def num_clients(self) -> int:
    return len(self._client_ids)

  def client_position(self, client_id: str) -> int:
    """The client's row in the per-client arrays (num_examples, category_count_matrix)."""
    try:
      return self._position[client_id]
    except (KeyError, TypeError):
      raise DataError(f'client_id must be one of the partition\'s {self.num_clients} clients. '
                      f'Found {client_id!r}.') from None

  def indices(self, client_id: str, split: Union[Split, str] = Split.TRAIN) -> np.ndarray:
    """Ascending example ids of one client's split: a read-only view, no copy."""
    split = as_split(split)
    i = self.client_position(client_id)
    offsets = self._offsets[split]
    return self._index[split][offsets[i]:offsets[i + 1]]

  def train_indices(self, client_id: str) -> np.ndarray:
    return self.indices(client_id, Split.TRAIN)

  def holdout_indices(self, client_id: str) -> np.ndarray:
    return self.indices(client_id, Split.HOLDOUT)

  @property
  def test_indices(self) -> np.ndarray:
    """Ascending example ids of the central test set (read-only)."""
    return self._test_index

  def csr(self, split: Union[Split, str] = Split.TRAIN) -> tuple[np.ndarray, np.ndarray]:
    """(index, offsets) of a split: client i holds index[offsets[i]:offsets[i + 1]]."""
    split = as_split(split)
    return self._index[split], self._offsets[split]

  def num_examples(self, split: Union[Split, str, None] = None) -> np.ndarray:
    """Examples per client, in client_ids order: of one split, or of both when split is None."""
    if split is None:
      return np.diff(self._offsets[Split.TRAIN]) + np.diff(self._offsets[Split.HOLDOUT])
    return np.diff(self._offsets[as_split(split)])

  def category_count_matrix(self, split: Union[Split, str, None] = None) -> np.ndarray:
    """(num_clients, NUM_CATEGORIES) example counts; both splits when split is None."""
    if split is None:
      return self._counts[Split.TRAIN] + self._counts[Split.HOLDOUT]
    return self._counts[as_split(split)].copy()

  def category_counts(self, client_id: str,
                      split: Union[Split, str, None] = None) -> np.ndarray:
    """Examples per category (label order) of one client; both splits when split is None."""
    i = self.client_position(client_id)
    if split is None:
      return self._counts[Split.TRAIN][i] + self._counts[Split.HOLDOUT][i]
    return self._counts[as_split(split)][i].copy()

  def check_source(self, labels: np.ndarray) -> None:
    """Raises DataError unless `labels` could be the partition's source.

    Checks the number of examples and every client's per-category counts in both splits: a
    cheap guard against pairing a partition (or a resumed run's manifest) with other data.
    """
    labels = np.asarray(labels)
    if labels.shape != (self.num_source_examples,):
      raise DataError(f'The source must have the partition\'s {self.num_source_examples} '
                      f'examples. Found {labels.shape[0] if labels.ndim else labels.shape}.')
    labels = _check_labels(labels)
    for split in Split:
      if not np.array_equal(_count_matrix(self._index[split], self._offsets[split], labels),
                            self._counts[split]):
        raise DataError('The source\'s labels do not give the partition\'s per-client '
                        f'category counts ({split.value} split): it is not the partition\'s '
                        'source.')

  def manifest(self) -> dict[str, Any]:
    """A JSON-able description: settings, and example ids (indices into the source) per client.

    `category_counts` covers all of a client's examples, `train_category_counts` its train split.
    """
    clients = {}
    lists = {}
    for split in Split:
      flat = self._index[split].tolist()
      bounds = self._offsets[split].tolist()
      lists[split] = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    train_counts = self._counts[Split.TRAIN].tolist()
    all_counts = self.category_count_matrix().tolist()
    for i, cid in enumerate(self._client_ids):
      clients[cid] = {
          'train': lists[Split.TRAIN][i],
          'holdout': lists[Split.HOLDOUT][i],
          'category_counts': dict(zip(categories.CATEGORY_IDS, all_counts[i])),
          'train_category_counts': dict(zip(categories.CATEGORY_IDS, train_counts[i])),
      }
    return {
        'format': MANIFEST_FORMAT,
        'scheme': self.scheme.value,
        'alpha': self.alpha,
        'seed': self.seed,
        'num_clients': self.num_clients,
        'test_fraction': self.test_fraction,
        'holdout_fraction': self.holdout_fraction,
        'size_skew': self.size_skew,
        'num_source_examples': self.num_source_examples,
        'source_fingerprint': self.source_fingerprint,
        'clients': clients,
        'test': self._test_index.tolist(),
    }

  def fingerprint(self) -> str:
    """sha256 (hex) of the manifest's canonical JSON: equal iff the partitions are equal."""
    if self._fingerprint is None:
      self._fingerprint = hashlib.sha256(_canonical_json(self.manifest())).hexdigest()
    return self._fingerprint

  def save_manifest(self, path: Union[str, 'os.PathLike[str]']) -> None:
    """Writes the manifest as JSON; atomically, so a reader never sees half a file."""
    # One string, one write: json.dump's many small writes take seconds at 59,000 clients.
    fileio.write_atomic(path, _canonical_json(self.manifest()))

  @classmethod
  def from_manifest(cls, manifest: Mapping[str, Any]) -> 'Partition':
    """Rebuilds a partition from `manifest()`'s output, checking that it is one."""
    return _from_manifest(manifest)

  def __eq__(self, other):
    return isinstance(other, Partition) and self.fingerprint() == other.fingerprint()

  def __hash__(self):
    return hash(self.fingerprint())

  def __repr__(self):
    alpha = f', alpha={self.alpha}' if self.alpha is not None else ''
    return (f'Partition({self.scheme.value}{alpha}, seed={self.seed}, '
            f'{self.num_clients} clients, {self._test_index.shape[0]} test examples)')


def _canonical_json(manifest: Mapping[str, Any]) -> bytes:
  return json.dumps(manifest, sort_keys=True, separators=(',', ':'), ensure_ascii=True,
                    allow_nan=False).encode('ascii')


def load_manifest(path: Union[str, 'os.PathLike[str]']) -> Partition:
  with open(path) as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f'Partition manifest {os.fspath(path)!r} is not valid JSON: {e}.') from None
  return Partition.from_manifest(manifest)


def partition(labels: np.ndarray,
              num_clients: int,
              scheme: Union[PartitionScheme, str],
              alpha: float = 0.5,
              seed: int = 0,
              test_fraction: float = 0.1,
              holdout_fraction: float = 0.1,
              size_skew: float = 0.0,
              source_fingerprint: Optional[str] = None) -> Partition:
  """Partitions examples (given by their labels) into a central test set and clients.

  Args:
    labels: (N,) integer labels in [0, NUM_CATEGORIES), e.g. `LabeledImages.labels`.
    num_clients: number of clients, at most the examples left after the test split.
    scheme: a `PartitionScheme` (or its value, 'iid' / 'dirichlet').
    alpha: Dirichlet concentration (DIRICHLET only; recorded as None for IID).
    seed: non-negative int; the same arguments and seed give the same partition.
    test_fraction: share of every category kept apart as the central test set, in [0, 1).
    holdout_fraction: share of each client's examples kept as its local holdout, in [0, 1).
    size_skew: sigma of the lognormal client size weights; 0 gives equal shares.
    source_fingerprint: identifies the source; defaults to `labels_fingerprint(labels)`.

  Returns:
    A `Partition`.

  Raises:
    DataError: labels are not usable.
    ConfigError: an argument is out of range, or there are fewer examples than clients.
  """
  labels = _check_labels(labels)
  scheme = _as_scheme(scheme)
  if not _is_int(num_clients) or num_clients <= 0:
    raise ConfigError(f'num_clients must be positive. Found {num_clients!r}.')
  if not _is_int(seed) or seed < 0:
    raise ConfigError(f'seed must be a non-negative integer. Found {seed!r}.')
  if scheme is PartitionScheme.DIRICHLET:
    if not _is_real(alpha) or alpha <= 0:
      raise ConfigError(f'alpha must be positive. Found {alpha!r}.')
    alpha = float(alpha)
  else:
    alpha = None
  for name, value in (('test_fraction', test_fraction), ('holdout_fraction', holdout_fraction)):
    if not _is_real(value) or not 0 <= value < 1:
      raise ConfigError(f'{name} must be in [0, 1). Found {value!r}.')
  if not _is_real(size_skew) or size_skew < 0:
    raise ConfigError(f'size_skew must be non-negative. Found {size_skew!r}.')
  if source_fingerprint is None:
    source_fingerprint = labels_fingerprint(labels)
  elif not isinstance(source_fingerprint, str) or not source_fingerprint:
    raise ConfigError(f'source_fingerprint must be a non-empty string. '
                      f'Found {source_fingerprint!r}.')
  seed, num_clients = int(seed), int(num_clients)

  def stream(key):
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))

  test, pool = _stratified_test_split(labels, float(test_fraction), stream(_TEST_STREAM))
  if num_clients > pool.shape[0]:
    raise ConfigError(
        f'num_clients must be at most the {pool.shape[0]} examples left after the test split '
        f'(every client needs one). Found {num_clients}.')
  rng = stream(_ASSIGN_STREAM)
  weights = _size_weights(num_clients, float(size_skew), rng)
  if scheme is PartitionScheme.IID:
    client_of = _assign_iid(pool, weights, rng)
  else:
    client_of = _assign_dirichlet(labels[pool], weights, alpha, rng)

  order, rank = _rank_within_groups(client_of, num_clients, stream(_HOLDOUT_STREAM))
  sizes = np.bincount(client_of, minlength=num_clients)
  num_holdout = np.minimum(_round_half_up(sizes * float(holdout_fraction)), sizes - 1)
  is_holdout = np.empty(pool.shape[0], bool)
  is_holdout[order] = rank < num_holdout[client_of[order]]

  train_index, train_offsets = _csr(pool[~is_holdout], client_of[~is_holdout], num_clients)
  holdout_index, holdout_offsets = _csr(pool[is_holdout], client_of[is_holdout], num_clients)
  return Partition(
      scheme=scheme, alpha=alpha, seed=seed, test_fraction=float(test_fraction),
      holdout_fraction=float(holdout_fraction), size_skew=float(size_skew),
      num_source_examples=int(labels.shape[0]), source_fingerprint=source_fingerprint,
      client_ids=_client_ids(num_clients), train_index=train_index, train_offsets=train_offsets,
      holdout_index=holdout_index, holdout_offsets=holdout_offsets, test_index=test,
      train_counts=_count_matrix(train_index, train_offsets, labels),
      holdout_counts=_count_matrix(holdout_index, holdout_offsets, labels))


def _manifest_error(message: str) -> DataError:
  return DataError(f'Not a valid partition manifest: {message}')


def _int_array(values: Any, what: str) -> np.ndarray:
  array = np.asarray(values)
  if array.size == 0:
    return np.zeros(0, np.int64)
  if array.ndim != 1 or array.dtype.kind not in 'iu':
    raise _manifest_error(f'{what} must be a list of integers.')
  return array.astype(np.int64)


_CATEGORY_SET = frozenset(categories.CATEGORY_IDS)


def _counts_row(value: Any, what: str) -> list[int]:
  # Plain type checks: this runs twice per client, 59,000 clients and more.
  if not isinstance(value, dict) or value.keys() != _CATEGORY_SET:
    raise _manifest_error(f'{what} must map each of {", ".join(categories.CATEGORY_IDS)} '
                          'to a count.')
  row = [value[c] for c in categories.CATEGORY_IDS]
  if not all(type(n) is int and n >= 0 for n in row):  # pylint: disable=unidiomatic-typecheck
    raise _manifest_error(f'{what} must hold non-negative integers.')
  return row


def _from_manifest(manifest: Mapping[str, Any]) -> Partition:
  if not isinstance(manifest, Mapping):
    raise _manifest_error(f'expected a JSON object. Found {type(manifest).__name__}.')
  required = ('format', 'scheme', 'alpha', 'seed', 'num_clients', 'test_fraction',
              'holdout_fraction', 'size_skew', 'num_source_examples', 'source_fingerprint',
              'clients', 'test')
  missing = [k for k in required if k not in manifest]
  if missing:
    raise _manifest_error(f'missing {", ".join(missing)}.')
  if manifest['format'] != MANIFEST_FORMAT:
    raise _manifest_error(f'format must be {MANIFEST_FORMAT!r}. Found {manifest["format"]!r}.')
  try:
    scheme = PartitionScheme(manifest['scheme'])
  except ValueError:
    raise _manifest_error(f'unknown scheme {manifest["scheme"]!r}.') from None
  alpha = manifest['alpha']
  if (scheme is PartitionScheme.IID) != (alpha is None) or (
      alpha is not None and (not _is_real(alpha) or alpha <= 0)):
    raise _manifest_error(f'alpha {alpha!r} does not fit scheme {scheme.value!r}.')
  for key in ('seed', 'num_clients', 'num_source_examples'):
    if not _is_int(manifest[key]) or manifest[key] < 0:
      raise _manifest_error(f'{key} must be a non-negative integer. Found {manifest[key]!r}.')
  for key in ('test_fraction', 'holdout_fraction', 'size_skew'):
    if not _is_real(manifest[key]) or manifest[key] < 0:
      raise _manifest_error(f'{key} must be a non-negative number. Found {manifest[key]!r}.')
  if not isinstance(manifest['source_fingerprint'], str):
    raise _manifest_error('source_fingerprint must be a string.')
  clients = manifest['clients']
  if not isinstance(clients, Mapping) or not clients:
    raise _manifest_error('clients must be a non-empty object.')
  if len(clients) != manifest['num_clients']:
    raise _manifest_error(f'num_clients is {manifest["num_clients"]} but {len(clients)} '
                          'clients are listed.')
  entries = list(clients.values())
  for cid, entry in clients.items():
    if not isinstance(entry, dict) or not (
        isinstance(entry.get('train'), list) and isinstance(entry.get('holdout'), list)):
      raise _manifest_error(f'client {cid!r} needs train and holdout lists.')
    if not entry['train']:
      raise _manifest_error(f'client {cid!r} has no train example.')

  n = manifest['num_source_examples']
  arrays = {}
  for split in Split:
    lengths = np.fromiter((len(e[split.value]) for e in entries), np.int64, len(entries))
    offsets = np.zeros(len(entries) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = _int_array(list(itertools.chain.from_iterable(e[split.value] for e in entries)),
                      f'{split.value} example ids')
    arrays[split] = (flat, offsets)
  test = _int_array(manifest['test'], 'test example ids')
  every = np.concatenate([arrays[Split.TRAIN][0], arrays[Split.HOLDOUT][0], test])
  if every.size != n or (every.size and (every.min() < 0 or every.max() >= n)) or (
      np.bincount(every, minlength=n).max(initial=0) > 1):
    raise _manifest_error(f'example ids must cover 0..{n - 1} exactly once across test, '
                          'train and holdout.')

  total = np.array([_counts_row(e.get('category_counts'), f'{cid}.category_counts')
                    for cid, e in clients.items()], np.int64).reshape(-1, _C)
  train = np.array([_counts_row(e.get('train_category_counts'), f'{cid}.train_category_counts')
                    for cid, e in clients.items()], np.int64).reshape(-1, _C)
  holdout = total - train
  for split, counts in ((Split.TRAIN, train), (Split.HOLDOUT, holdout)):
    if (counts < 0).any() or (counts.sum(axis=1) != np.diff(arrays[split][1])).any():
      raise _manifest_error(f'category counts do not add up to the {split.value} lists.')

  def sorted_groups(flat, offsets):
    # Ascending ids inside each client, as partition() stores them.
    owners = np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets))
    return flat[np.lexsort((flat, owners))], offsets

  train_index, train_offsets = sorted_groups(*arrays[Split.TRAIN])
  holdout_index, holdout_offsets = sorted_groups(*arrays[Split.HOLDOUT])
  return Partition(
      scheme=scheme, alpha=None if alpha is None else float(alpha), seed=int(manifest['seed']),
      test_fraction=float(manifest['test_fraction']),
      holdout_fraction=float(manifest['holdout_fraction']),
      size_skew=float(manifest['size_skew']), num_source_examples=int(n),
      source_fingerprint=manifest['source_fingerprint'], client_ids=list(clients),
      train_index=train_index, train_offsets=train_offsets, holdout_index=holdout_index,
      holdout_offsets=holdout_offsets, test_index=np.sort(test), train_counts=train,
      holdout_counts=holdout)
