"""A tamper-evident audit log of training rounds: run_dir/audit_log.jsonl, one keyed record a line.

Keying, the chain's anchors and what verification detects: docs/DESIGN.md.
"""

import dataclasses
import datetime
import enum
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from tff_medical import categories
from tff_medical import fileio
from tff_medical import run_files
from tff_medical.errors import TffMedicalError

AUDIT_LOG_FILENAME = run_files.AUDIT_FILE
AUDIT_VERSION = 2
GENESIS_HASH = '0' * 64
GENESIS_MAC = GENESIS_HASH
KEY_FILE_ENV = 'TFF_MEDICAL_AUDIT_KEY_FILE'
KEY_BYTES = 32
ANCHOR_DIRNAME = 'heads'

ALLOWED_FIELDS = frozenset({
    'time', 'round', 'participants', 'num_participants', 'categories_released', 'clip_norms',
    'update_norm', 'epsilon_spent', 'client_level_epsilon', 'model_sha256',
    # The round's wall time depends on the sampled clients' data: kept here (confidential), never
    # in the published metrics.
    'round_seconds',
    # The first record's statement of what this log is (CONFIDENTIAL_NOTICE).
    'notice',
})

# Written into the first record of every log: the custodian keeps the participants for audit
# controls (HIPAA 164.312(b)), and must not publish them.
CONFIDENTIAL_NOTICE = (
    'CONFIDENTIAL: this audit log names the clients of every round. It stays with the data '
    'custodian (audit controls need it) and must not be published: the privacy ledger accounts '
    'each round as a secret random sample of clients, and publishing who took part voids that '
    'sampling amplification, so the published epsilons would no longer hold.')
_KEYED_FIELDS = frozenset({'audit_version', 'key_id', 'prev_mac', 'mac'})
_LEGACY_FIELDS = frozenset({'prev_hash', 'record_hash'})
_CHAIN_FIELDS = _KEYED_FIELDS | _LEGACY_FIELDS

_CLIENT_ID = re.compile(r'client_[0-9]+')
_SHA256_HEX = re.compile(r'[0-9a-f]{64}')
_KEY_ID = re.compile(r'[0-9a-f]{16}')
# Ledger and audit record are written from the same float; the tolerance only absorbs printing.
_EPSILON_REL_TOL = 1e-9


class AuditError(TffMedicalError):
  """A record that may not enter the audit log, or a log that cannot be appended to or read."""


class AuditKeyError(AuditError):
  """The custodian key is missing, unreadable or not owner-only."""


class AuditVerificationError(AuditError):
  """The log failed verification; `result` says where and why."""

  def __init__(self, message: str, result: 'VerifyResult'):
    super().__init__(message)
    self.result = result


class Status(enum.Enum):
  """What a verification found."""
  OK = 'ok'  # Keyed, intact, and consistent with every reference available.
  UNKEYED = 'unkeyed'  # An old plain-hash log: readable, intact as far as a hash can tell.
  WRONG_KEY = 'wrong_key'  # Keyed with another key than the verifier's.
  BROKEN = 'broken'  # A bad line, a broken link, or a mismatch with an anchor, head or ledger.


@dataclasses.dataclass(frozen=True)
class VerifyResult:
  """The outcome of `verify_chain` / `verify_run_dir`.

  Attributes:
    ok: True only for Status.OK.
    records: the number of valid records before the first bad line (all of them when ok).
    first_bad_line: the 1-based line of the first bad line (for a missing tail, the line where
      the first missing record would be); None when ok or when no line is at fault (a ledger
      that disagrees with an intact log).
    reason: what is wrong ('' when ok).
    status: see `Status`.
    bad_round: the round of the record at first_bad_line, when known.
    head: the last verified record's {'audit_version', 'round', 'mac', 'key_id'}; None if
      the log is not keyed.
    checked: the references the log was compared with (anchor, expected head, ledger).
    notes: what could not be checked, as "not checked: <note>" reads (e.g. no anchor).
  """

  ok: bool
  records: int
  first_bad_line: Optional[int]
  reason: str
  status: Status = Status.OK
  bad_round: Optional[int] = None
  head: Optional[dict] = None
  checked: tuple = ()
  notes: tuple = ()

  def describe(self) -> str:
    """One line for a person: what was verified, or where and why it failed."""
    if self.status is Status.OK:
      text = (f'{self.records} keyed records intact (key id {self.head["key_id"]}), '
              f'head round {self.head["round"]}')
      if self.checked:
        text += '; matches ' + ', '.join(self.checked)
      return text
    if self.status is Status.WRONG_KEY:
      return f'wrong key: {self.reason}'
    if self.status is Status.UNKEYED:
      return self.reason
    if self.first_bad_line is None:
      return f'broken: {self.reason}'
    where = f'line {self.first_bad_line}'
    if self.bad_round is not None:
      where += f' (round {self.bad_round})'
    return f'broken at {where}: {self.reason}'


# The custodian key.


def default_key_file() -> str:
  """$TFF_MEDICAL_AUDIT_KEY_FILE, else ~/.config/tff_medical/audit.key (absolute)."""
  configured = os.environ.get(KEY_FILE_ENV)
  if configured:
    return os.path.abspath(os.path.expanduser(configured))
  return os.path.join(os.path.expanduser('~'), '.config', 'tff_medical', 'audit.key')


@dataclasses.dataclass(frozen=True)
class AuditKey:
  """The custodian's secret and where it lives. The secret is never printed."""

  path: str
  secret: bytes = dataclasses.field(repr=False)

  @property
  def key_id(self) -> str:
    # A public name for the key: a hash prefix tells keys apart and reveals nothing usable.
    return hashlib.sha256(self.secret).hexdigest()[:16]

  @property
  def anchor_dir(self) -> str:
    return os.path.join(os.path.dirname(self.path), ANCHOR_DIRNAME)


def _private_dir(path: str) -> None:
  """Creates `path` (0700) if missing; refuses a folder that another user could write to."""
  parent = os.path.dirname(path)
  if parent and not os.path.isdir(parent):
    os.makedirs(parent, exist_ok=True)
  try:
    os.mkdir(path, 0o700)
  except FileExistsError:
    pass
  except OSError as e:
    raise AuditKeyError(f'audit key folder {path} must be creatable. Found: {e.strerror}.') from None
  info = os.lstat(path)
  if not stat.S_ISDIR(info.st_mode):
    raise AuditKeyError(f'audit key folder {path} must be a folder. Found another kind of file '
                        '(a symbolic link?).')
  if info.st_uid not in (os.geteuid(), 0) or info.st_mode & 0o022:
    # Another user who can write here could swap the key or the anchors (root is trusted).
    raise AuditKeyError(f'audit key folder {path} must be owned and writable by this user only. '
                        f'Found owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}.')


def _read_key(path: str) -> bytes:
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  except FileNotFoundError:
    raise AuditKeyError(
        f'audit key must be a file. Found none at {path}. Verifying needs the key the log was '
        f'written with: set {KEY_FILE_ENV} or pass its path (--key_file).') from None
  except OSError as e:
    raise AuditKeyError(f'audit key {path} must be a readable regular file. Found: '
                        f'{e.strerror}.') from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise AuditKeyError(f'audit key {path} must be a regular file. Found another kind.')
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
      raise AuditKeyError(f'audit key {path} must be owned and readable by this user only '
                          f'(mode 0600). Found owner uid {info.st_uid}, mode '
                          f'{stat.S_IMODE(info.st_mode):04o}.')
    secret = os.read(fd, KEY_BYTES + 1)
  finally:
    os.close(fd)
  if len(secret) != KEY_BYTES:
    raise AuditKeyError(f'audit key {path} must hold {KEY_BYTES} bytes. Found {len(secret)}'
                        f'{" or more" if len(secret) > KEY_BYTES else ""}.')
  return secret


def _create_key(path: str) -> None:
  """Writes a new key at `path` unless one exists; never readable by others, never partial."""
  directory = os.path.dirname(path)
  _private_dir(directory)
  # Written in full to a private temporary name, then linked into place: a concurrent reader
  # sees no key or the whole key, and link() refuses to replace a key another process made.
  temporary = os.path.join(directory, f'.{os.path.basename(path)}.{secrets.token_hex(8)}.tmp')
  fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
               0o600)
  try:
    try:
      os.write(fd, os.urandom(KEY_BYTES))
      os.fsync(fd)
    finally:
      os.close(fd)
    try:
      os.link(temporary, path)
      logging.info('Created the audit key %s (keep it: verifying the audit log needs it).', path)
    except FileExistsError:
      pass  # Another process created it first; that one is the key.
    except OSError as e:
      raise AuditKeyError(f'audit key {path} must be creatable. Found: {e.strerror}.') from None
  finally:
    os.unlink(temporary)
  _fsync_dir(directory)


def load_key(key_file: Optional['str | os.PathLike[str]'] = None, *,
             create: bool = False) -> AuditKey:
  """The custodian key at `key_file` (default: `default_key_file()`).

  Args:
    key_file: the key's path; None for the default.
    create: make a new key when there is none (the writer); a verifier never does.

  Raises:
    AuditKeyError: no key (and create is False), or one that is not an owner-only 32-byte file.
  """
  path = os.path.abspath(os.fspath(key_file)) if key_file is not None else default_key_file()
  if create and not os.path.lexists(path):
    _create_key(path)
  elif os.path.lexists(path):
    # Also for an existing key: another user able to write its folder could replace it.
    _private_dir(os.path.dirname(path))
  return AuditKey(path, _read_key(path))


# Record encoding.


def _canonical_json(record: Mapping[str, Any]) -> str:
  # allow_nan=False: NaN/Infinity are not JSON, and other readers would reject the line.
  return json.dumps(record, sort_keys=True, separators=(',', ':'), allow_nan=False)


def record_mac(record: Mapping[str, Any], secret: bytes) -> str:
  """HMAC-SHA256 hex, under `secret`, of the record's canonical JSON without "mac"."""
  body = {k: v for k, v in record.items() if k != 'mac'}
  return hmac.new(secret, _canonical_json(body).encode('utf-8'), hashlib.sha256).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
  """Unkeyed (old) logs: SHA-256 hex of the canonical JSON without "record_hash"."""
  body = {k: v for k, v in record.items() if k != 'record_hash'}
  return hashlib.sha256(_canonical_json(body).encode('utf-8')).hexdigest()


def _is_keyed(record: Mapping[str, Any]) -> bool:
  return 'mac' in record or 'audit_version' in record


def model_weights_sha256(weights: Sequence[np.ndarray]) -> str:
  """SHA-256 hex of a list of weight arrays: count, then each array's dtype, shape and bytes.

  Dtype and shape are hashed with the bytes so that the same bytes read as another dtype or
  shape give another hash; each header is length-delimited so arrays cannot run into each other.
  """
  digest = hashlib.sha256()
  digest.update(f'arrays={len(weights)}\n'.encode('ascii'))
  for weight in weights:
    array = np.ascontiguousarray(np.asarray(weight))
    header = f'dtype={array.dtype.str};shape={list(array.shape)};bytes={array.nbytes}\n'
    digest.update(header.encode('ascii'))
    digest.update(array.tobytes(order='C'))
  return digest.hexdigest()


def utc_now_iso() -> str:
  """The current time, UTC, ISO-8601 with a 'Z' suffix, to the second."""
  now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
  return now.isoformat().replace('+00:00', 'Z')


# Field checks. Each returns a problem ("X must be Y. Found Z.") or None.


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value))


def _json_value_problem(field: str, value: Any) -> Optional[str]:
  """Only JSON numbers, strings, lists and objects (string keys), recursively."""
  if isinstance(value, str) or _is_number(value):
    return None
  if isinstance(value, (list, tuple)):
    for item in value:
      problem = _json_value_problem(field, item)
      if problem:
        return problem
    return None
  if isinstance(value, dict):
    for key, item in value.items():
      if not isinstance(key, str):
        return f'{field} keys must be strings. Found {key!r}.'
      problem = _json_value_problem(field, item)
      if problem:
        return problem
    return None
  # bool, None, NaN and anything else (a tensor, an object): the caller converts it first.
  return (f'{field} values must be JSON numbers, strings, lists or objects. '
          f'Found {value!r} of type {type(value).__name__}.')


def _check_time(value: Any) -> Optional[str]:
  try:
    parsed = datetime.datetime.fromisoformat(value) if isinstance(value, str) else None
  except ValueError:
    parsed = None
  if parsed is None or parsed.utcoffset() != datetime.timedelta(0):
    return f'time must be a UTC ISO-8601 string like 2024-01-31T12:00:00Z. Found {value!r}.'
  return None


def _check_non_negative_int(field: str, value: Any) -> Optional[str]:
  if not _is_int(value) or value < 0:
    return f'{field} must be a non-negative integer. Found {value!r}.'
  return None


def _check_non_negative_number(field: str, value: Any) -> Optional[str]:
  if not _is_number(value) or value < 0:
    return f'{field} must be a finite non-negative number. Found {value!r}.'
  return None


def _check_participants(value: Any) -> Optional[str]:
  if not isinstance(value, list) or not all(
      isinstance(v, str) and _CLIENT_ID.fullmatch(v) for v in value):
    # The value itself is not quoted: it may be the very identifier being refused.
    return ('participants must be a list of pseudonymous client ids like client_00042. '
            'Found a value that is not.')
  if len(set(value)) != len(value):
    return 'participants must not repeat a client id. Found a repeated id.'
  return None


def _check_category_list(field: str, value: Any) -> Optional[str]:
  if not isinstance(value, list) or not all(v in categories.LABEL_OF for v in value):
    return (f'{field} must be a list of category ids ({", ".join(categories.CATEGORY_IDS)}). '
            f'Found {value!r}.')
  return None


def _check_category_numbers(field: str, value: Any) -> Optional[str]:
  if not isinstance(value, dict) or not all(k in categories.LABEL_OF for k in value):
    return (f'{field} must be an object keyed by category ids '
            f'({", ".join(categories.CATEGORY_IDS)}). Found keys {_keys(value)}.')
  for key, number in value.items():
    if not _is_number(number) or number < 0:
      return f'{field}.{key} must be a finite non-negative number. Found {number!r}.'
  return None


def _keys(value: Any) -> Any:
  return sorted(map(str, value)) if isinstance(value, dict) else repr(value)


def _check_sha256(field: str, value: Any) -> Optional[str]:
  if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
    return f'{field} must be 64 lowercase hex digits. Found {value!r}.'
  return None


_FIELD_CHECKS = {
    'time': _check_time,
    'round': lambda v: _check_non_negative_int('round', v),
    'participants': _check_participants,
    'num_participants': lambda v: _check_non_negative_int('num_participants', v),
    'categories_released': lambda v: _check_category_list('categories_released', v),
    'clip_norms': lambda v: _check_category_numbers('clip_norms', v),
    'update_norm': lambda v: _check_non_negative_number('update_norm', v),
    'round_seconds': lambda v: _check_non_negative_number('round_seconds', v),
    'notice': lambda v: None if isinstance(v, str) else f'notice must be a string. Found {v!r}.',
    'epsilon_spent': lambda v: _check_category_numbers('epsilon_spent', v),
    'client_level_epsilon': lambda v: _check_non_negative_number('client_level_epsilon', v),
    'model_sha256': lambda v: _check_sha256('model_sha256', v),
    'prev_hash': lambda v: _check_sha256('prev_hash', v),
    'record_hash': lambda v: _check_sha256('record_hash', v),
    'prev_mac': lambda v: _check_sha256('prev_mac', v),
    'mac': lambda v: _check_sha256('mac', v),
    'key_id': lambda v: (None if isinstance(v, str) and _KEY_ID.fullmatch(v) else
                         f'key_id must be 16 lowercase hex digits. Found {v!r}.'),
    'audit_version': lambda v: (None if v == AUDIT_VERSION else
                                f'audit_version must be {AUDIT_VERSION}. Found {v!r}.'),
}


def _record_problem(record: Any, chain_fields: frozenset = frozenset()) -> Optional[str]:
  """Why `record` may not be a new record (no chain_fields) or is not a stored one; else None."""
  if not isinstance(record, dict):
    return f'record must be a JSON object. Found {type(record).__name__}.'
  allowed = ALLOWED_FIELDS | chain_fields
  unknown = sorted(set(record) - allowed)
  if unknown:
    # Key names are the caller's code, not data, so naming them is safe and helpful.
    return (f'record fields must be among {", ".join(sorted(allowed))}. '
            f'Found unexpected {", ".join(map(repr, unknown))}.')
  required = {'time', 'round'} | chain_fields
  missing = sorted(required - set(record))
  if missing:
    return f'record must have the fields {", ".join(missing)}. Found none.'
  for field, value in record.items():
    problem = _FIELD_CHECKS[field](value) or _json_value_problem(field, value)
    if problem:
      return problem
  if ('participants' in record and 'num_participants' in record and
      record['num_participants'] != len(record['participants'])):
    return (f'num_participants must equal the number of participants '
            f'({len(record["participants"])}). Found {record["num_participants"]!r}.')
  return None


def _plain(value: Any) -> Any:
  """numpy numbers to Python numbers and tuples to lists, recursively; the rest is checked later.

  Round counters and norms often come out of numpy or TF as numpy scalars.
  """
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.floating):
    return float(value)
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


# The anchor: the latest head of each log, kept beside the key (outside every run directory).


def anchor_path(key: AuditKey, log_path: 'str | os.PathLike[str]') -> str:
  """<key folder>/heads/<sha256 of the log's real path>.json."""
  real = os.path.realpath(os.fspath(log_path))
  name = hashlib.sha256(real.encode('utf-8', 'surrogateescape')).hexdigest()
  return os.path.join(key.anchor_dir, f'{name}.json')


def _head_problem(head: Any) -> Optional[str]:
  if not isinstance(head, Mapping):
    return f'must be an object with round and mac. Found {type(head).__name__}.'
  if not _is_int(head.get('round')) or head['round'] < 0:
    return f'round must be a non-negative integer. Found {head.get("round")!r}.'
  if not isinstance(head.get('mac'), str) or not _SHA256_HEX.fullmatch(head['mac']):
    return f'mac must be 64 lowercase hex digits. Found {head.get("mac")!r}.'
  return None


def _read_anchor(key: AuditKey, log_path: str) -> Optional[dict[str, Any]]:
  """The anchored head of `log_path`, or None when there is none. Raises AuditError if damaged."""
  path = anchor_path(key, log_path)
  try:
    with open(path, encoding='utf-8') as f:
      anchor = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise AuditError(f'audit anchor {path} must be readable JSON. Found: {e}.') from None
  problem = _head_problem(anchor)
  if problem is None and not (isinstance(anchor.get('first_mac'), str) and
                              _SHA256_HEX.fullmatch(anchor['first_mac'])):
    problem = f'first_mac must be 64 lowercase hex digits. Found {anchor.get("first_mac")!r}.'
  if problem:
    raise AuditError(f'audit anchor {path} {problem}')
  return anchor


def _write_anchor(key: AuditKey, log_path: str, head: Mapping[str, Any], first_mac: str) -> None:
  _private_dir(key.anchor_dir)
  anchor = dict(head, first_mac=first_mac, log=os.path.realpath(log_path), time=utc_now_iso())
  try:
    # 0600 through mkstemp from the start; replaced atomically, so a reader never sees half.
    fileio.write_atomic(anchor_path(key, log_path), json.dumps(anchor, sort_keys=True) + '\n',
                        mode=0o600)
  except OSError as e:
    raise AuditError(f'audit anchor {anchor_path(key, log_path)} must be writable. Found: '
                     f'{e.strerror}.') from None


def _keyed_head(record: Mapping[str, Any]) -> dict[str, Any]:
  return {'audit_version': AUDIT_VERSION, 'round': record['round'], 'mac': record['mac'],
          'key_id': record['key_id']}


class AuditLog:
  """Appends keyed, chained records to an audit log file. One writer per file at a time.

  Args:
    path: the log file (run_dir/audit_log.jsonl).
    key_file: the custodian key; None for `default_key_file()`. Created at the first append (or
      head()) when it does not exist yet.
  """

  def __init__(self, path: 'str | os.PathLike[str]',
               key_file: Optional['str | os.PathLike[str]'] = None):
    self._path = os.fspath(path)
    self._key_file = key_file
    self._key: Optional[AuditKey] = None

  @property
  def path(self) -> str:
    return self._path

  def key(self) -> AuditKey:
    """The writer's key, created on first use."""
    if self._key is None:
      self._key = load_key(self._key_file, create=True)
    return self._key

  def _ends_with_partial_line(self) -> bool:
    try:
      with open(self._path, 'rb') as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
          return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b'\n'
    except FileNotFoundError:
      return False

  def _last_line(self) -> Optional[bytes]:
    """The last complete line, read backwards from the end (logs grow with every round)."""
    try:
      f = open(self._path, 'rb')
    except FileNotFoundError:
      return None
    with f:
      end = f.seek(0, os.SEEK_END)
      if end == 0:
        return None
      tail = b''
      position = end
      # Stop once the tail holds a newline before the final one: the line is complete.
      while position > 0 and tail[:-1].count(b'\n') == 0:
        step = min(4096, position)
        position -= step
        f.seek(position)
        tail = f.read(step) + tail
      return tail[:-1].rsplit(b'\n', 1)[-1] if tail.endswith(b'\n') else None

  def _first_line(self) -> Optional[bytes]:
    try:
      with open(self._path, 'rb') as f:
        line = f.readline()
    except FileNotFoundError:
      return None
    return line if line.endswith(b'\n') else None

  def records(self) -> list[dict[str, Any]]:
    """All records, in file order. Raises AuditError on a line that is not a JSON object."""
    return list(_iter_records(self._path))

  def last_record(self) -> Optional[dict[str, Any]]:
    """The last complete record, or None for an absent or empty log."""
    if self._ends_with_partial_line():
      raise AuditError(f'audit log {self._path} must end with a complete record. Found a '
                       'partial last line (an interrupted write); call repair_partial_tail().')
    line = self._last_line()
    if line is None:
      return None
    try:
      record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
      record = None
    if not isinstance(record, dict):
      raise AuditError(f'audit log {self._path} last line must be a JSON record. Found another '
                       'line; run experiments/verify_audit.py.')
    return record

  def last_round(self) -> Optional[int]:
    record = self.last_record()
    return None if record is None else record.get('round')

  def _intact_last(self, key: AuditKey) -> Optional[dict[str, Any]]:
    """The last record, checked against the key and the anchor; None for an empty log."""
    last = self.last_record()
    if last is None:
      return None
    if not _is_keyed(last):
      raise AuditError(f'audit log {self._path} must be keyed to be extended. Found an unkeyed '
                       'log (written before audit records were keyed): start a new run directory.')
    if last.get('key_id') != key.key_id:
      raise AuditError(f'audit log {self._path} must be keyed with this key (key id '
                       f'{key.key_id}, {key.path}). Found key id {last.get("key_id")!r}: set '
                       f'{KEY_FILE_ENV} to the key the run was started with.')
    if (_record_problem(last, _KEYED_FIELDS) or
        not hmac.compare_digest(last['mac'], record_mac(last, key.secret))):
      # Chaining onto a damaged record would hide the damage behind a valid-looking link.
      raise AuditError(f'audit log {self._path} last record must be intact. Found a damaged '
                       'record; run experiments/verify_audit.py.')
    return last

  def head(self) -> dict[str, Any]:
    """The chain head {'audit_version', 'round', 'mac', 'key_id'}: round 0 and 64 zeros when
    the log is empty. Keep it with each checkpoint; `verify_against` checks it on resume.

    Raises:
      AuditError: the last record is not intact or not keyed with this key.
    """
    key = self.key()
    last = self._intact_last(key)
    if last is None:
      return {'audit_version': AUDIT_VERSION, 'round': 0, 'mac': GENESIS_MAC,
              'key_id': key.key_id}
    return _keyed_head(last)

  def verify(self, **kwargs) -> 'VerifyResult':
    """`verify_chain` of this log with this log's key; kwargs as there."""
    # Never creates a key: a verifier without the writer's key must say so, not make another.
    key_file = self._key.path if self._key is not None else self._key_file
    return verify_chain(self._path, key_file=key_file, **kwargs)

  def verify_against(self, head: Mapping[str, Any]) -> 'VerifyResult':
    """Verifies the whole log, its anchor, and that `head` (from `head()`) is in it.

    Raises:
      AuditVerificationError: any failure (result.describe() says which line and why).
    """
    result = self.verify(expected_head=head)
    if not result.ok:
      raise AuditVerificationError(f'audit log {self._path} {result.describe()}', result)
    return result

  def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
    """Keys and chains `record` to the last one, writes it durably, then moves the anchor.

    Args:
      record: fields among `ALLOWED_FIELDS`; "round" is required and must be the last round + 1;
        "time" defaults to now (UTC).

    Returns:
      The record as written, with "audit_version", "key_id", "prev_mac" and "mac".

    Raises:
      AuditError (a ValueError): a field outside the allow-list, a value of the wrong type, a
        round out of sequence, a log whose last record is damaged, partial, unkeyed or keyed
        with another key, or a log shorter than its anchor (records were removed).
    """
    if not isinstance(record, Mapping):
      raise AuditError(f'record must be a dict. Found {type(record).__name__}.')
    if set(record) & _CHAIN_FIELDS:
      raise AuditError('record must not set chain fields. Found '
                       f'{", ".join(sorted(set(record) & _CHAIN_FIELDS))}; append() adds them.')
    entry = {k: _plain(v) for k, v in record.items()}
    entry.setdefault('time', utc_now_iso())
    problem = _record_problem(entry)
    if problem:
      raise AuditError(problem)

    key = self.key()
    last = self._intact_last(key)
    anchor = _read_anchor(key, self._path)
    if last is None:
      if anchor is not None and entry['round'] != 1:
        raise AuditError(
            f'audit log {self._path} must hold the chain anchored up to round {anchor["round"]}. '
            'Found an empty log: its records were removed; restore them or start a new run '
            'directory.')
      if anchor is not None:
        logging.warning('Starting a new audit chain in %s; the previous one (anchored up to '
                        'round %d) is no longer there.', self._path, anchor['round'])
      prev_mac = GENESIS_MAC
      entry.setdefault('notice', CONFIDENTIAL_NOTICE)
    else:
      if anchor is not None:
        first = json.loads(self._first_line())
        if (first.get('mac') != anchor['first_mac'] or anchor['round'] > last['round'] or
            (anchor['round'] == last['round'] and anchor['mac'] != last['mac'])):
          raise AuditError(
              f'audit log {self._path} must extend the chain anchored up to round '
              f'{anchor["round"]}. Found a log ending at round {last["round"]} that does not: '
              'records were removed or replaced; run experiments/verify_audit.py.')
      if entry['round'] != last['round'] + 1:
        raise AuditError(f'round must be {last["round"] + 1} (the last logged round + 1). '
                         f'Found {entry["round"]}.')
      prev_mac = last['mac']
    entry.update(audit_version=AUDIT_VERSION, key_id=key.key_id, prev_mac=prev_mac)
    entry['mac'] = record_mac(entry, key.secret)
    line = (_canonical_json(entry) + '\n').encode('utf-8')

    created = not os.path.exists(self._path)
    # One write of the whole line: a kill leaves at most a partial last line, never a mixed one.
    # Created 0600: the log names every round's participants (run_files.CONFIDENTIAL).
    fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with open(fd, 'ab') as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
    if created:
      _fsync_dir(os.path.dirname(os.path.abspath(self._path)))
    # After the record is durable: a kill in between leaves the anchor one round behind, which
    # the verifier accepts (the record after the anchor is keyed and linked to it).
    first_mac = entry['mac'] if last is None else json.loads(self._first_line())['mac']
    _write_anchor(key, self._path, _keyed_head(entry), first_mac)
    return entry

  def repair_partial_tail(self) -> bool:
    """Truncates a partial last line (from a killed writer); True when something was removed.

    A complete last line (ending in a newline) is never touched, even if it is not valid JSON:
    that is for `verify_chain` to report, not for a repair to erase.
    """
    if not self._ends_with_partial_line():
      return False
    with open(self._path, 'r+b') as f:
      data_end = f.seek(0, os.SEEK_END)
      position = data_end
      keep = 0
      while position > 0:
        step = min(4096, position)
        position -= step
        f.seek(position)
        newline = f.read(step).rfind(b'\n')
        if newline >= 0:
          keep = position + newline + 1
          break
      f.truncate(keep)
      f.flush()
      os.fsync(f.fileno())
    return True


def _fsync_dir(directory: str) -> None:
  # Makes a newly created file's directory entry durable, so the log survives a power loss.
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _iter_records(path: str) -> Iterator[dict[str, Any]]:
  with open(path, 'rb') as f:
    for number, line in enumerate(f, start=1):
      try:
        record = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
      if not isinstance(record, dict):
        raise AuditError(f'audit log {path} line {number} must be a JSON record. Found another '
                         'line; run experiments/verify_audit.py.')
      yield record


# Verification.


class _Failed(Exception):
  """Internal: stops a scan with a result."""

  def __init__(self, result: VerifyResult):
    super().__init__(result.reason)
    self.result = result


def _scan(path: str, key: Optional[AuditKey], key_error: Optional[AuditKeyError]):
  """Checks every line; returns (keyed, count, {round: (line, mac)}, last record, first mac)."""
  count = 0
  prev = GENESIS_MAC
  prev_round = None
  keyed = None
  macs: dict[int, tuple[int, str]] = {}
  last = None
  first_mac = None

  def fail(number, reason, record=None, status=Status.BROKEN):
    bad_round = record.get('round') if isinstance(record, dict) else None
    raise _Failed(VerifyResult(
        ok=False, records=count, first_bad_line=number, reason=reason, status=status,
        bad_round=bad_round if _is_int(bad_round) else None))

  with open(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      if not raw.endswith(b'\n'):
        fail(number, 'incomplete last line (an interrupted write; '
             'AuditLog.repair_partial_tail() removes it)')
      try:
        record = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
      if not isinstance(record, dict):
        fail(number, 'not a JSON record')
      if keyed is None:
        keyed = _is_keyed(record)
        if keyed and key is None:
          raise key_error
      elif _is_keyed(record) != keyed:
        fail(number, 'an unkeyed record in a keyed log' if keyed else
             'a keyed record after unkeyed ones', record)

      if keyed:
        key_id = record.get('key_id')
        if key_id != key.key_id:
          if number == 1:
            fail(number, f'the log was keyed with key id {key_id!r}, but the key at {key.path} '
                 f'has key id {key.key_id} (another custodian key, or a log keyed by someone '
                 'else)', record, Status.WRONG_KEY)
          fail(number, f'key_id {key_id!r} differs from the records before it '
               f'({key.key_id}): the record was not written with this log\'s key', record)
        try:
          expected_mac = record_mac(record, key.secret)
        except ValueError:  # NaN or Infinity, which append() never writes.
          expected_mac = None
        mac = record.get('mac')
        if not isinstance(mac, str) or expected_mac is None or not hmac.compare_digest(
            mac, expected_mac):
          fail(number, 'mac does not match the record: it was changed after it was written '
               '(or written without the custodian key)', record)
        if raw != (_canonical_json(record) + '\n').encode('utf-8'):
          fail(number, 'the line is not in the canonical form append() writes (edited: '
               'repeated or reformatted fields)', record)
        problem = _record_problem(record, _KEYED_FIELDS)
        link, link_field = record['prev_mac'], 'prev_mac'
      else:
        problem = _record_problem(record, _LEGACY_FIELDS)
        if not problem and record_hash(record) != record['record_hash']:
          problem = 'record_hash does not match the record (a field was changed)'
        link, link_field = record.get('prev_hash'), 'prev_hash'
      if problem:
        fail(number, problem, record)
      if link != prev:
        if number == 1:
          fail(number, f'{link_field} is not the genesis value (the first record was removed)',
               record)
        fail(number, f'{link_field} does not match the previous record (a record was removed, '
             'inserted or moved)', record)
      if prev_round is not None and record['round'] != prev_round + 1:
        fail(number, f'round must be {prev_round + 1}. Found {record["round"]}.', record)
      prev = record['mac'] if keyed else record['record_hash']
      prev_round = record['round']
      macs[prev_round] = (number, prev)
      first_mac = first_mac or prev
      last = record
      count += 1
  return bool(keyed), count, macs, last, first_mac


def _check_head(head: Mapping[str, Any], source: str, count: int, last_round: Optional[int],
                macs: Mapping[int, tuple[int, str]]) -> None:
  """Raises _Failed unless `head` is a record of the verified chain (round 0: the empty head)."""
  wanted = head['round']
  if wanted == 0:
    if head['mac'] != GENESIS_MAC:
      raise AuditError(f'{source} round 0 must have the genesis mac (64 zeros). '
                       f'Found {head["mac"]!r}.')
    return
  if wanted not in macs:
    ends = f'round {last_round}' if last_round is not None else 'no record'
    reason = (f'records removed from the end: the log ends at {ends}, but {source} is '
              f'round {wanted}')
    if last_round is not None and wanted < last_round:
      reason = f'{source} round {wanted} is not in the log (its first round is {min(macs)})'
    raise _Failed(VerifyResult(ok=False, records=count, first_bad_line=count + 1, reason=reason,
                               status=Status.BROKEN))
  line, mac = macs[wanted]
  if not hmac.compare_digest(mac, head['mac']):
    raise _Failed(VerifyResult(
        ok=False, records=count, first_bad_line=line, bad_round=wanted, status=Status.BROKEN,
        reason=f'the record of round {wanted} is not {source}: the log was replaced or rewritten'))


def _verify(path: str, key_file, expected_records: Optional[int],
            expected_head: Optional[Mapping[str, Any]], use_anchor: bool):
  """verify_chain, also returning the last record (for the ledger comparison)."""
  if not os.path.isfile(path):
    raise AuditError(f'audit log must be a file. Found none at {path}.')
  if expected_head is not None:
    problem = _head_problem(expected_head)
    if problem:
      raise AuditError(f'expected head {problem}')
  try:
    key, key_error = load_key(key_file), None
  except AuditKeyError as e:
    key, key_error = None, e
  try:
    keyed, count, macs, last, first_mac = _scan(path, key, key_error)
    if count == 0 and key is None:
      raise key_error  # An empty log: only the anchor can tell whether records were removed.
    checked, notes = [], []
    last_round = last['round'] if last else None
    anchor = _read_anchor(key, path) if key is not None and use_anchor else None
    if not keyed and count:
      if key is None:
        notes.append(f'whether this log replaced a keyed one (no usable key: {key_error})')
      if anchor is not None:
        raise _Failed(VerifyResult(
            ok=False, records=count, first_bad_line=1, bad_round=1, status=Status.BROKEN,
            reason=f'the log is unkeyed, but a keyed chain up to round {anchor["round"]} was '
            'anchored for it: it was replaced'))
      if expected_head is not None:
        raise _Failed(VerifyResult(
            ok=False, records=count, first_bad_line=1, status=Status.BROKEN,
            reason='the log is unkeyed, so it cannot hold the expected (keyed) head'))
    elif anchor is not None:
      if count and anchor['first_mac'] != first_mac:
        raise _Failed(VerifyResult(
            ok=False, records=count, first_bad_line=1, bad_round=min(macs),
            status=Status.BROKEN, reason='the first record is not the one anchored for this '
            'log: the log was replaced'))
      _check_head(anchor, 'the custodian\'s anchored head', count, last_round, macs)
      checked.append(f'the anchor (round {anchor["round"]})')
    elif use_anchor and count:
      notes.append('records removed from the end, other than against the ledger or an expected '
                   'head: there is no anchor for this log beside the key (the run directory was '
                   'moved or copied, or another key folder is in use)')
    if expected_head is not None and keyed:
      _check_head(expected_head, 'the expected head', count, last_round, macs)
      checked.append(f'the expected head (round {expected_head["round"]})')
    elif expected_head is not None and count == 0:
      _check_head(expected_head, 'the expected head', count, last_round, macs)
    if expected_records is not None:
      if count != expected_records:
        raise _Failed(VerifyResult(
            ok=False, records=count, first_bad_line=min(count, expected_records) + 1,
            status=Status.BROKEN,
            reason=f'expected {expected_records} records. Found {count} (records removed '
            'from or added at the end)'))
      checked.append(f'{expected_records} expected records')
  except _Failed as failed:
    return failed.result, None
  if not keyed and count:
    return VerifyResult(
        ok=False, records=count, first_bad_line=None, status=Status.UNKEYED,
        reason=f'unkeyed (not tamper-evident): {count} records with a plain SHA-256 chain, '
        'intact as far as a plain hash can tell; anyone can edit a record and recompute every '
        'hash', checked=tuple(checked), notes=tuple(notes)), last
  head = ({'audit_version': AUDIT_VERSION, 'round': 0, 'mac': GENESIS_MAC, 'key_id': key.key_id}
          if last is None else _keyed_head(last))
  return VerifyResult(ok=True, records=count, first_bad_line=None, reason='', head=head,
                      checked=tuple(checked), notes=tuple(notes)), last


def verify_chain(path: 'str | os.PathLike[str]',
                 expected_records: Optional[int] = None, *,
                 expected_head: Optional[Mapping[str, Any]] = None,
                 key_file: Optional['str | os.PathLike[str]'] = None,
                 use_anchor: bool = True) -> VerifyResult:
  """Checks every line of an audit log, the chain between them, and where the chain ends.

  What is detected, line by line and at the end: docs/DESIGN.md.

  Args:
    path: the audit_log.jsonl file.
    expected_records: the number of records there must be (e.g. the ledger's rounds_completed).
    expected_head: a head from `AuditLog.head()` (e.g. kept in a checkpoint) that must be in
      the log.
    key_file: the custodian key; None for `default_key_file()`. Never created here.
    use_anchor: compare with the anchor beside the key (False only to test the other checks).

  Returns:
    A VerifyResult. An old unkeyed log gives Status.UNKEYED (ok False) when its plain chain is
    intact, so that it reads as "not tamper-evident" rather than as verified.

  Raises:
    AuditError: no file at `path`, a malformed expected_head, or a damaged anchor.
    AuditKeyError: the log is keyed (or empty) and there is no usable key.
  """
  return _verify(os.fspath(path), key_file, expected_records, expected_head, use_anchor)[0]


def _close(a: Any, b: Any) -> bool:
  return _is_number(a) and _is_number(b) and math.isclose(a, b, rel_tol=_EPSILON_REL_TOL,
                                                          abs_tol=1e-12)


def _ledger_problem(ledger_json: Optional[Mapping[str, Any]], count: int,
                    last: Optional[Mapping[str, Any]],
                    pending_record: Optional[Mapping[str, Any]]) -> Optional[tuple[str, bool]]:
  """(why the ledger and the log disagree, whether a tail line is at fault), or None."""
  if ledger_json is None:
    if last is not None and 'epsilon_spent' in last:
      return (f'the audit records carry epsilon_spent, but there is no privacy ledger '
              f'({run_files.LEDGER_FILE}): it was removed', False)
    return None
  rounds = ledger_json['rounds_completed']
  target, what = last, f'the audit record of round {last["round"]}' if last else ''
  last_round = last['round'] if last is not None else 0
  if rounds != count:
    if (pending_record is not None and rounds == count + 1 and
        pending_record.get('round') == last_round + 1):
      # Killed after the ledger was saved, before the record was appended: the checkpoint's
      # record of that round (which resume is about to append) is the reference.
      target, what = pending_record, f'the checkpoint\'s record of round {rounds}'
    else:
      return (f'expected {rounds} records (the privacy ledger\'s rounds_completed). Found '
              f'{count}: records removed from or added at the end, or the ledger was edited',
              True)
  if target is None:
    return None
  entries = ledger_json.get('categories')
  logged = target.get('epsilon_spent')
  if isinstance(logged, Mapping) and isinstance(entries, Mapping):
    for c in sorted(set(logged) | set(entries)):
      recorded = entries.get(c, {}).get('epsilon_spent') if isinstance(entries.get(c),
                                                                       Mapping) else None
      if not _close(recorded, logged.get(c)):
        return (f'the privacy ledger says {c} epsilon_spent {recorded!r}, {what} says '
                f'{logged.get(c)!r}: the ledger (or the record) was edited', False)
  recorded = ledger_json.get('client_level_epsilon')
  logged = target.get('client_level_epsilon')
  if recorded is not None and logged is not None and not _close(recorded, logged):
    return (f'the privacy ledger says client_level_epsilon {recorded!r}, {what} says '
            f'{logged!r}: the ledger (or the record) was edited', False)
  return None


def _read_ledger(run_dir: str) -> Optional[dict[str, Any]]:
  ledger_path = os.path.join(run_dir, run_files.LEDGER_FILE)
  if not os.path.exists(ledger_path):
    return None
  try:
    with open(ledger_path, encoding='utf-8') as f:
      ledger_json = json.load(f)
    expected = ledger_json['rounds_completed']
  except (OSError, ValueError, KeyError, TypeError):
    raise AuditError(f'privacy ledger {ledger_path} must be JSON with rounds_completed. '
                     'Found a file without it.') from None
  if not _is_int(expected) or expected < 0:
    raise AuditError(f'privacy ledger rounds_completed must be a non-negative integer. '
                     f'Found {expected!r}.')
  return ledger_json


def verify_run_dir(run_dir: 'str | os.PathLike[str]', *,
                   expected_records: Optional[int] = None,
                   expected_head: Optional[Mapping[str, Any]] = None,
                   pending_record: Optional[Mapping[str, Any]] = None,
                   key_file: Optional['str | os.PathLike[str]'] = None) -> VerifyResult:
  """`verify_chain` on run_dir/audit_log.jsonl, then the privacy ledger against the log.

  The ledger (privacy_ledger.json), when present, must count as many rounds as there are records
  and carry the same per-category and client-level epsilon as the last record: the keyed record
  is the reference, so a ledger whose spend was lowered is reported.

  Args:
    run_dir: the run folder.
    expected_records, expected_head: see `verify_chain` (e.g. a checkpoint's head, on resume).
    pending_record: on resume, the checkpoint's audit record of the round that was checkpointed
      but possibly not yet appended; a ledger one round ahead of the log must match it.
    key_file: see `verify_chain`.
  """
  run_dir = os.fspath(run_dir)
  if not os.path.isdir(run_dir):
    raise AuditError(f'run_dir must be a folder. Found none at {run_dir}.')
  ledger_json = _read_ledger(run_dir)
  result, last = _verify(os.path.join(run_dir, AUDIT_LOG_FILENAME), key_file, expected_records,
                         expected_head, True)
  if result.status not in (Status.OK, Status.UNKEYED):
    return result
  problem = _ledger_problem(ledger_json, result.records, last, pending_record)
  if problem:
    reason, at_tail = problem
    return dataclasses.replace(
        result, ok=False, status=Status.BROKEN, reason=reason,
        first_bad_line=(min(result.records, ledger_json['rounds_completed']) + 1
                        if at_tail else None))
  if ledger_json is not None and result.ok:
    result = dataclasses.replace(
        result, checked=result.checked + (f'the privacy ledger ({ledger_json["rounds_completed"]} '
                                          'rounds, epsilon)',))
  return result


def require_intact(run_dir: 'str | os.PathLike[str]', **kwargs) -> VerifyResult:
  """`verify_run_dir` (same arguments) for a program that must stop unless the log verifies.

  Raises:
    AuditVerificationError: the log is broken, unkeyed or keyed with another key (the message
      says which line and why; `.result` holds the VerifyResult).
    AuditKeyError, AuditError: see `verify_chain`.
  """
  result = verify_run_dir(run_dir, **kwargs)
  if not result.ok:
    path = os.path.join(os.fspath(run_dir), AUDIT_LOG_FILENAME)
    raise AuditVerificationError(f'audit log {path} {result.describe()}', result)
  return result
