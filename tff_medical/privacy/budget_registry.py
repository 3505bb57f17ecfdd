"""A privacy budget per data set, not per run: what every run on a data set's images spent, per
category, in one owner-only file per data set (docs/PRIVACY.md).
"""

import contextlib
import copy
import datetime
import enum
import errno
import fcntl
import hashlib
import json
import math
import numbers
import os
import re
import stat
from typing import Any, Iterator, Mapping, Optional, Union

import dp_accounting
import numpy as np

from tff_medical import categories
from tff_medical import fileio
from tff_medical.errors import DataError
from tff_medical.errors import parse_enum
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy.accounting import Accountant
from tff_medical.privacy.sampling import SamplingMethod
from tff_medical.privacy.sampling import SamplingSpec

SCHEMA_VERSION = 1
REGISTRY_ENV = 'TFF_MEDICAL_BUDGET_REGISTRY'
_DEFAULT_SUBDIR = os.path.join('.local', 'share', 'tff_medical', 'budget_registry')
_FINGERPRINT_RE = re.compile(r'[0-9a-f]{64}')
# Versioned, so that a future change of the hashed form cannot collide with today's keys.
_FINGERPRINT_TAG = b'tff_medical dataset fingerprint v1\n'
_ENTRY_KEYS = ('private', 'started', 'rounds', 'accountant', 'sampling', 'spend')
# Optional: the run's client-level rounds (one Gaussian a round over its released categories).
_OPTIONAL_ENTRY_KEYS = ('client_level',)
_TOP_KEYS = ('schema_version', 'dataset_fingerprint', 'runs')
_MAX_RUN_ID = 200


Relation = accounting.Relation


RELATIONS = tuple(r.value for r in Relation)


def as_relation(value: Union[Relation, str]) -> Relation:
  return parse_enum(Relation, value, 'relation', PolicyError)


# --- Data set identity ---------------------------------------------------------------------------


def dataset_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
  """SHA-256 hex of a labelled image set, independent of the order of the images.

  Each (label, image) pair is hashed on its own; the sorted digests are hashed together, so the
  same images give the same key however the folder was listed, and one changed pixel or label,
  or one image more or less, gives another key. Only decoded pixels and labels go in: never file
  names or paths.

  Args:
    images: uint8 [N, 64, 64], as the loaders return them.
    labels: integer [N], category indices in [0, NUM_CATEGORIES).

  Raises:
    DataError: for arrays of another shape, type or label range.
  """
  size = categories.IMAGE_SIZE
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size) or (
      images.shape[0] == 0):
    raise DataError(f'images must be a non-empty uint8 array of shape [N, {size}, {size}]. '
                    f'Found {images.dtype} {images.shape}.')
  if labels.shape != (images.shape[0],) or labels.dtype.kind not in 'iu':
    raise DataError(f'labels must be an integer array of shape [{images.shape[0]}]. '
                    f'Found {labels.dtype} {labels.shape}.')
  if labels.min() < 0 or labels.max() >= categories.NUM_CATEGORIES:
    raise DataError(f'labels must be in [0, {categories.NUM_CATEGORIES}). '
                    f'Found [{labels.min()}, {labels.max()}].')
  images = np.ascontiguousarray(images)
  fixed_labels = labels.astype('<i8')
  digests = sorted(
      hashlib.sha256(fixed_labels[i].tobytes() + images[i].tobytes()).digest()
      for i in range(images.shape[0]))
  total = hashlib.sha256(_FINGERPRINT_TAG)
  total.update(f'{images.shape[0]} {size}x{size} uint8\n'.encode('ascii'))
  for digest in digests:
    total.update(digest)
  return total.hexdigest()


# --- Directory and files -------------------------------------------------------------------------


def _private_dir(directory: Union[str, 'os.PathLike[str]']) -> str:
  """Creates `directory` 0700 if missing; refuses one that another user could write in."""
  directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  created = not os.path.exists(directory)
  try:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if created:
      os.chmod(directory, 0o700)  # makedirs' mode is masked by the umask; be exact.
    info = os.stat(directory)
  except OSError as e:
    raise PolicyError(f'budget registry directory must be a directory we can create and use. '
                      f'Found {directory!r}: {e.strerror}.') from None
  if not stat.S_ISDIR(info.st_mode):
    raise PolicyError(f'budget registry directory must be a directory. Found {directory!r}.')
  if info.st_uid != os.geteuid():
    raise PolicyError(f'budget registry directory must be owned by this user (uid '
                      f'{os.geteuid()}): another user could delete the records and reset budgets. '
                      f'Found {directory!r} owned by uid {info.st_uid}.')
  if info.st_mode & 0o022:
    raise PolicyError(f'budget registry directory must not be writable by group or others: they '
                      f'could delete the records and reset budgets. Found {directory!r} with mode '
                      f'{stat.S_IMODE(info.st_mode):o}. Use a private directory '
                      f'(chmod 700, or set {REGISTRY_ENV}).')
  return directory


def default_registry_dir() -> str:
  """$TFF_MEDICAL_BUDGET_REGISTRY if set (and not empty), else
  ~/.local/share/tff_medical/budget_registry; created 0700 if missing."""
  configured = os.environ.get(REGISTRY_ENV)
  directory = configured if configured else os.path.join(os.path.expanduser('~'), _DEFAULT_SUBDIR)
  return _private_dir(directory)


def now_iso() -> str:
  """The current UTC time, as an entry's `started`."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


# --- Entry validation ----------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _normalize_groups(where: str, raw: Any) -> list[list]:
  """[[z, count], ...] validated, with consecutive equal multipliers merged."""
  if not isinstance(raw, (list, tuple)):
    raise PolicyError(f'{where} must be a list of [noise_multiplier, count] pairs. '
                      f'Found {raw!r}.')
  groups: list[list] = []
  for item in raw:
    if not (isinstance(item, (list, tuple)) and len(item) == 2):
      raise PolicyError(f'{where} must be a list of [noise_multiplier, count] pairs. '
                        f'Found {item!r}.')
    z, count = item
    if (isinstance(z, bool) or not isinstance(z, numbers.Real) or not math.isfinite(z) or
        z <= 0):
      raise PolicyError(f'{where} noise multipliers must be positive and finite (a run without '
                        f'noise is recorded as private: false). Found {z!r}.')
    if not _is_int(count) or count < 1:
      raise PolicyError(f'{where} counts must be positive integers. Found {count!r}.')
    z, count = float(z), int(count)
    if groups and groups[-1][0] == z:
      groups[-1][1] += count
    else:
      groups.append([z, count])
  return groups


def _normalize_spend(where: str, raw: Any, rounds: int) -> dict[str, dict[str, list[list]]]:
  if not isinstance(raw, Mapping):
    raise PolicyError(f'{where} must be an object {{category id: {{relation: groups}}}}. '
                      f'Found {raw!r}.')
  spend = {}
  for category_id, by_relation in raw.items():
    if category_id not in categories.CATEGORY_IDS:
      raise PolicyError(f'{where} category ids must be among '
                        f'{", ".join(categories.CATEGORY_IDS)}. Found {category_id!r}.')
    # Both relations are required: a missing one would count as nothing spent under it.
    if not isinstance(by_relation, Mapping) or set(by_relation) != set(RELATIONS):
      raise PolicyError(f'{where}.{category_id} must have exactly the relations '
                        f'{", ".join(RELATIONS)}. Found {by_relation!r}.')
    spend[category_id] = {}
    for relation in RELATIONS:
      groups = _normalize_groups(f'{where}.{category_id}.{relation}', by_relation[relation])
      released = sum(count for _, count in groups)
      if released > rounds:
        raise PolicyError(f'{where}.{category_id}.{relation} must count at most the run\'s '
                          f'{rounds} rounds. Found {released}.')
      spend[category_id][relation] = groups
  return spend


def validate_entry(entry: Any, where: str = 'entry') -> dict[str, Any]:
  """A run's entry checked and normalized (groups merged); PolicyError naming what is wrong."""
  if not isinstance(entry, Mapping):
    raise PolicyError(f'{where} must be a JSON object. Found {entry!r}.')
  missing = [k for k in _ENTRY_KEYS if k not in entry]
  unknown = sorted(str(k) for k in entry if k not in _ENTRY_KEYS + _OPTIONAL_ENTRY_KEYS)
  if missing or unknown:
    # Unknown keys are refused so that nothing else (a run directory, client ids) slips in.
    raise PolicyError(f'{where} must have exactly the keys {", ".join(_ENTRY_KEYS)}. Found '
                      f'missing {missing} and unknown {unknown}.')
  private = entry['private']
  if not isinstance(private, bool):
    raise PolicyError(f'{where}.private must be true or false. Found {private!r}.')
  started = entry['started']
  try:
    datetime.datetime.fromisoformat(started)
  except (TypeError, ValueError):
    raise PolicyError(f'{where}.started must be an ISO 8601 time. Found {started!r}.') from None
  rounds = entry['rounds']
  if not _is_int(rounds) or rounds < 0:
    raise PolicyError(f'{where}.rounds must be a non-negative integer. Found {rounds!r}.')
  accountant, sampling = entry['accountant'], entry['sampling']
  if private or accountant is not None or sampling is not None:
    # A non-private run may leave both null; a private one needs them to be accounted.
    accountant = accounting.as_accountant(accountant).value
    spec = SamplingSpec.from_json_dict(sampling)
    accounting.check_sampling_accountant(spec, accountant)
    sampling = spec.to_json_dict()
  normalized = {
      'private': private,
      'started': started,
      'rounds': int(rounds),
      'accountant': accountant,
      'sampling': sampling,
      'spend': _normalize_spend(f'{where}.spend', entry['spend'], int(rounds)),
  }
  if 'client_level' in entry:
    normalized['client_level'] = _normalize_groups(f'{where}.client_level', entry['client_level'])
  return normalized


def make_entry(private: bool,
               rounds: int,
               accountant: Optional[Union[Accountant, str]],
               sampling: Optional[SamplingSpec],
               spend: Mapping[str, Mapping[str, Any]],
               started: Optional[str] = None,
               client_level: Optional[list] = None) -> dict[str, Any]:
  """An entry for `BudgetRegistry.record`, validated; `started` defaults to now (UTC)."""
  entry = {
      'private': private,
      'started': started if started is not None else now_iso(),
      'rounds': rounds,
      'accountant': None if accountant is None else accounting.as_accountant(accountant).value,
      'sampling': None if sampling is None else sampling.to_json_dict(),
      'spend': spend,
  }
  if client_level is not None:
    entry['client_level'] = client_level
  return validate_entry(entry)


def _extends(old: list[list], new: list[list]) -> bool:
  """Whether `new` is `old` with rounds appended (the last recorded group may have grown)."""
  if not old:
    return True
  if len(new) < len(old) or new[:len(old) - 1] != old[:-1]:
    return False
  (old_z, old_count), (new_z, new_count) = old[-1], new[len(old) - 1]
  return new_z == old_z and new_count >= old_count


def _update_problems(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  problems = []
  if new['rounds'] < old['rounds']:
    problems.append(f'rounds must not go back. Found {new["rounds"]}, recorded {old["rounds"]}')
  if new['private'] and not old['private']:
    problems.append('private must stay false: the run already released a non-private model')
  for field in ('started', 'accountant', 'sampling'):
    if new[field] != old[field]:
      problems.append(f'{field} must stay as first recorded. Found {new[field]!r}, recorded '
                      f'{old[field]!r}')
  for category_id, by_relation in old['spend'].items():
    for relation, groups in by_relation.items():
      if not groups:
        continue
      now = new['spend'].get(category_id, {}).get(relation, [])
      if not _extends(groups, now):
        problems.append(f'spend.{category_id}.{relation} must extend the recorded groups '
                        f'{groups}. Found {now}')
  return problems


# --- The registry --------------------------------------------------------------------------------


class BudgetRegistry:
  """The runs recorded on one data set, in <directory>/<fingerprint>.json."""

  def __init__(self, directory: Union[str, 'os.PathLike[str]'], fingerprint: str):
    if not isinstance(fingerprint, str) or not _FINGERPRINT_RE.fullmatch(fingerprint):
      raise PolicyError(f'dataset fingerprint must be 64 lowercase hex digits (SHA-256). Found '
                        f'{fingerprint!r}.')
    self._directory = _private_dir(directory)
    self._fingerprint = fingerprint
    self._path = os.path.join(self._directory, f'{fingerprint}.json')
    self._lock_path = os.path.join(self._directory, f'{fingerprint}.lock')
    self._lock_fd: Optional[int] = None
    self._lock_depth = 0

  @property
  def path(self) -> str:
    return self._path

  @property
  def fingerprint(self) -> str:
    return self._fingerprint

  @contextlib.contextmanager
  def locked(self) -> Iterator['BudgetRegistry']:
    """Holds the data set's exclusive lock (re-entrant in this object).

    Hold it across a check and the record that follows (`spent`, then `record`), so that two
    runs starting together cannot both take the same remaining budget.
    """
    if self._lock_depth == 0:
      try:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
      except OSError as e:
        raise PolicyError(f'budget registry lock {self._lock_path!r} must be a file we can '
                          f'open. Found: {e.strerror}.') from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
      except BaseException:
        os.close(fd)
        raise
      self._lock_fd = fd
    self._lock_depth += 1
    try:
      yield self
    finally:
      self._lock_depth -= 1
      if self._lock_depth == 0:
        fd, self._lock_fd = self._lock_fd, None
        os.close(fd)  # Closing the descriptor releases the flock.

  def _load(self) -> dict[str, Any]:
    """The file's content, validated; an empty registry only if the file does not exist."""
    try:
      fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
      return {'schema_version': SCHEMA_VERSION, 'dataset_fingerprint': self._fingerprint,
              'runs': {}}
    except OSError as e:
      reason = 'a symbolic link' if e.errno == errno.ELOOP else e.strerror
      raise PolicyError(f'budget registry file {self._path!r} must be readable: {reason}. It '
                        f'is never reset automatically, as that would restart every budget; '
                        f'restore it from a backup.') from None
    try:
      with os.fdopen(fd, 'rb') as f:
        raw = json.loads(f.read().decode('utf-8'))
      return self._validate(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, PolicyError) as e:
      raise PolicyError(f'budget registry file {self._path!r} must be a valid registry. Found: '
                        f'{e}. It is never reset automatically, as that would restart every '
                        f'budget; restore it from a backup.') from None

  def _validate(self, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) != set(_TOP_KEYS):
      raise PolicyError(f'the registry must be an object with the keys {", ".join(_TOP_KEYS)}')
    if raw['schema_version'] != SCHEMA_VERSION:
      raise PolicyError(f'schema_version must be {SCHEMA_VERSION}. Found '
                        f'{raw["schema_version"]!r}')
    if raw['dataset_fingerprint'] != self._fingerprint:
      raise PolicyError(f'dataset_fingerprint must be the file\'s name, {self._fingerprint}. '
                        f'Found {raw["dataset_fingerprint"]!r}')
    if not isinstance(raw['runs'], dict):
      raise PolicyError(f'runs must be an object. Found {raw["runs"]!r}')
    raw['runs'] = {run_id: validate_entry(entry, f'runs[{run_id!r}]')
                   for run_id, entry in raw['runs'].items()}
    return raw

  @staticmethod
  def _check_run_id(run_id: Any) -> str:
    if not isinstance(run_id, str) or not 0 < len(run_id) <= _MAX_RUN_ID or (
        not run_id.isprintable()):
      raise PolicyError(f'run_id must be a printable string of 1 to {_MAX_RUN_ID} characters. '
                        f'Found {run_id!r}.')
    return run_id

  def record(self, run_id: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Creates or updates `run_id`'s entry; returns it as stored.

    Raises:
      PolicyError: for an invalid entry, or an update that would roll spend back (fewer rounds,
        spend groups that do not extend the recorded ones, a non-private run made private, a
        changed start time, accountant or sampling). The file is then left untouched.
    """
    run_id = self._check_run_id(run_id)
    entry = validate_entry(entry, f'entry of run {run_id!r}')
    with self.locked():
      content = self._load()
      old = content['runs'].get(run_id)
      if old is not None:
        problems = _update_problems(old, entry)
        if problems:
          raise PolicyError(f'an update of run {run_id!r} in budget registry {self._path!r} must '
                            f'not roll spend back (spend is never rolled back): '
                            f'{"; ".join(problems)}.')
      content['runs'][run_id] = entry
      fileio.write_atomic(self._path, json.dumps(content, indent=1, sort_keys=True) + '\n',
                          mode=0o600)
    return copy.deepcopy(entry)

  def runs(self) -> dict[str, dict[str, Any]]:
    """Every recorded run: {run_id: entry}."""
    return self._load()['runs']

  def entry(self, run_id: str) -> Optional[dict[str, Any]]:
    return self.runs().get(self._check_run_id(run_id))

  def earlier(self, exclude_run_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every run but `exclude_run_id`, oldest first."""
    exclude_run_id = self._check_run_id(exclude_run_id)
    others = [(r, e) for r, e in self.runs().items() if r != exclude_run_id]
    return sorted(others, key=lambda item: (item[1]['started'], item[0]))

  def non_private_runs(self, exclude_run_id: str) -> list[str]:
    return [r for r, e in self.earlier(exclude_run_id) if not e['private']]

  def prior_events(self,
                   exclude_run_id: str,
                   category_id: str,
                   relation: Union[Relation, str],
                   sampling_method: Optional[Union[SamplingMethod, str]] = None
                  ) -> list[tuple[dp_accounting.DpEvent, int]]:
    """The earlier private runs' spend of a category under a relation, as (event, count) pairs.

    Each group becomes (accounting.round_event(z, that run's SamplingSpec), count), ready for
    accounting.epsilon together with the current run's events. Non-private runs are not here
    (see `non_private_runs`: they make the spend infinite).

    Args:
      exclude_run_id: The current run.
      category_id: One of categories.CATEGORY_IDS.
      relation: Relation or its value.
      sampling_method: The current run's sampling method; None only checks that the earlier
        runs agree among themselves.

    Raises:
      PolicyError: if an earlier run with spend here used another sampling method (Poisson and
        sampling without replacement are accounted under different relations and cannot be
        composed), naming the run.
    """
    if category_id not in categories.CATEGORY_IDS:
      raise PolicyError(f'category_id must be one of {", ".join(categories.CATEGORY_IDS)}. '
                        f'Found {category_id!r}.')
    relation = as_relation(relation).value
    method_run = None
    if sampling_method is not None:
      method_run = (parse_enum(SamplingMethod, sampling_method, 'sampling method', PolicyError),
                    'the current run')
    events = []
    for run_id, entry in self.earlier(exclude_run_id):
      if not entry['private']:
        continue
      groups = entry['spend'].get(category_id, {}).get(relation, [])
      if not groups:
        continue
      spec = SamplingSpec.from_json_dict(entry['sampling'])
      if method_run is None:
        method_run = (spec.method, f'run {run_id!r}')
      elif spec.method is not method_run[0]:
        raise PolicyError(
            f'earlier runs on this data set must use the same sampling method as {method_run[1]} '
            f'({method_run[0].value}) for their {category_id} spend to be composed under one '
            f'relation. Found run {run_id!r} with {spec.method.value} sampling (registry '
            f'{self._path!r}).')
      events.extend((accounting.round_event(z, spec), count) for z, count in groups)
    return events

  def spent(self,
            exclude_run_id: str,
            category_id: str,
            delta: float,
            accountant: Union[Accountant, str] = Accountant.RDP,
            sampling_method: Optional[Union[SamplingMethod, str]] = None) -> float:
    """Epsilon already spent on `category_id` by the other runs: the larger over both relations.

    0.0 if nothing was spent; inf if any other run on this data set was not private.
    """
    if self.non_private_runs(exclude_run_id):
      return math.inf
    return max(
        accounting.epsilon(
            self.prior_events(exclude_run_id, category_id, relation, sampling_method), delta,
            accountant) for relation in RELATIONS)
