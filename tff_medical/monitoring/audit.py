"""A tamper-evident audit log of training rounds: run_dir/audit_log.jsonl, one record per line.

Each record holds what a reviewer needs to check a round (who took part, pseudonymously; what was
released; the clip norms; the privacy spent; a hash of the resulting model) and is chained to the
one before it: "prev_hash" is the previous record's "record_hash" (64 zeros for the first), and
"record_hash" is the SHA-256 of the record's canonical JSON without "record_hash". Changing,
deleting or reordering a record breaks the chain at that line, unless every later hash is forged
too. Removing records from the END leaves a valid chain, so `verify_chain` also takes the number
of records expected (the privacy ledger's rounds_completed).

No patient identifier may enter a record: only the fields of `ALLOWED_FIELDS` are accepted, each
with a checked type, participants must be pseudonymous ids ('client_00042') and category names
must be category ids. Free text has no field to go in.
"""

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from tff_medical import categories
from tff_medical.errors import TffMedicalError
from tff_medical.privacy import ledger

AUDIT_LOG_FILENAME = 'audit_log.jsonl'
GENESIS_HASH = '0' * 64

ALLOWED_FIELDS = frozenset({
    'time', 'round', 'participants', 'num_participants', 'categories_released', 'clip_norms',
    'update_norm', 'epsilon_spent', 'client_level_epsilon', 'model_sha256',
})
_CHAIN_FIELDS = frozenset({'prev_hash', 'record_hash'})

_CLIENT_ID = re.compile(r'client_[0-9]+')
_SHA256_HEX = re.compile(r'[0-9a-f]{64}')


class AuditError(TffMedicalError):
  """A record that may not enter the audit log, or a log that cannot be appended to or read."""


@dataclasses.dataclass(frozen=True)
class VerifyResult:
  """The outcome of `verify_chain`.

  Attributes:
    ok: True when every line is a valid record chained to the one before.
    records: the number of valid records before the first bad line (all of them when ok).
    first_bad_line: the 1-based line number of the first bad line; None when ok.
    reason: what is wrong with that line ('' when ok).
  """

  ok: bool
  records: int
  first_bad_line: Optional[int]
  reason: str


def _canonical_json(record: Mapping[str, Any]) -> str:
  # allow_nan=False: NaN/Infinity are not JSON, and other readers would reject the line.
  return json.dumps(record, sort_keys=True, separators=(',', ':'), allow_nan=False)


def record_hash(record: Mapping[str, Any]) -> str:
  """SHA-256 hex of the record's canonical JSON, "record_hash" excluded, "prev_hash" included."""
  body = {k: v for k, v in record.items() if k != 'record_hash'}
  return hashlib.sha256(_canonical_json(body).encode('utf-8')).hexdigest()


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
    'epsilon_spent': lambda v: _check_category_numbers('epsilon_spent', v),
    'client_level_epsilon': lambda v: _check_non_negative_number('client_level_epsilon', v),
    'model_sha256': lambda v: _check_sha256('model_sha256', v),
    'prev_hash': lambda v: _check_sha256('prev_hash', v),
    'record_hash': lambda v: _check_sha256('record_hash', v),
}


def _record_problem(record: Any, chain_fields: bool) -> Optional[str]:
  """Why `record` may not be (chain_fields=False) or is not (True) a stored record; else None."""
  if not isinstance(record, dict):
    return f'record must be a JSON object. Found {type(record).__name__}.'
  allowed = ALLOWED_FIELDS | _CHAIN_FIELDS if chain_fields else ALLOWED_FIELDS
  unknown = sorted(set(record) - allowed)
  if unknown:
    # Key names are the caller's code, not data, so naming them is safe and helpful.
    return (f'record fields must be among {", ".join(sorted(allowed))}. '
            f'Found unexpected {", ".join(map(repr, unknown))}.')
  required = {'time', 'round'} | (_CHAIN_FIELDS if chain_fields else set())
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


class AuditLog:
  """Appends chained records to an audit log file. One writer per file at a time."""

  def __init__(self, path: 'str | os.PathLike[str]'):
    self._path = os.fspath(path)

  @property
  def path(self) -> str:
    return self._path

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

  def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
    """Chains `record` to the last one and writes it durably (flush + fsync).

    Args:
      record: fields among `ALLOWED_FIELDS`; "round" is required and must be the last round + 1;
        "time" defaults to now (UTC).

    Returns:
      The record as written, with "prev_hash" and "record_hash".

    Raises:
      AuditError (a ValueError): a field outside the allow-list, a value of the wrong type, a
        round out of sequence, or a log whose last record is damaged or partial.
    """
    if not isinstance(record, Mapping):
      raise AuditError(f'record must be a dict. Found {type(record).__name__}.')
    if set(record) & _CHAIN_FIELDS:
      raise AuditError('record must not set prev_hash or record_hash. Found '
                       f'{", ".join(sorted(set(record) & _CHAIN_FIELDS))}; append() adds them.')
    entry = {k: _plain(v) for k, v in record.items()}
    entry.setdefault('time', utc_now_iso())
    problem = _record_problem(entry, chain_fields=False)
    if problem:
      raise AuditError(problem)

    last = self.last_record()
    if last is None:
      prev_hash = GENESIS_HASH
    else:
      if _record_problem(last, chain_fields=True) or record_hash(last) != last['record_hash']:
        # Chaining onto a damaged record would hide the damage behind a valid-looking link.
        raise AuditError(f'audit log {self._path} last record must be intact. Found a damaged '
                         'record; run experiments/verify_audit.py.')
      if entry['round'] != last['round'] + 1:
        raise AuditError(f'round must be {last["round"] + 1} (the last logged round + 1). '
                         f'Found {entry["round"]}.')
      prev_hash = last['record_hash']
    entry['prev_hash'] = prev_hash
    entry['record_hash'] = record_hash(entry)
    line = (_canonical_json(entry) + '\n').encode('utf-8')

    created = not os.path.exists(self._path)
    # One write of the whole line: a kill leaves at most a partial last line, never a mixed one.
    with open(self._path, 'ab') as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
    if created:
      _fsync_dir(os.path.dirname(os.path.abspath(self._path)))
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


def verify_chain(path: 'str | os.PathLike[str]',
                 expected_records: Optional[int] = None) -> VerifyResult:
  """Checks every line of an audit log and the chain between them.

  Detected, at the first line where it shows: a changed field (its record_hash no longer
  matches), a deleted or reordered record (prev_hash does not match the line before; for the
  first line, it is not the genesis hash), a forged hash, a line that is not a JSON record or has
  fields outside the allow-list, and round numbers that do not increase by one.

  Args:
    path: the audit_log.jsonl file.
    expected_records: if given, the number of records there must be (e.g. the privacy ledger's
      rounds_completed); catches records removed from the end, which no hash chain can.

  Returns:
    A VerifyResult.

  Raises:
    AuditError: there is no file at `path`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AuditError(f'audit log must be a file. Found none at {path}.')
  prev_hash = GENESIS_HASH
  prev_round = None
  count = 0

  def bad(line_number: int, reason: str) -> VerifyResult:
    return VerifyResult(ok=False, records=count, first_bad_line=line_number, reason=reason)

  with open(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      if not raw.endswith(b'\n'):
        return bad(number, 'incomplete last line (an interrupted write; '
                   'AuditLog.repair_partial_tail() removes it)')
      try:
        record = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError):
        return bad(number, 'not a JSON record')
      problem = _record_problem(record, chain_fields=True)
      if problem:
        return bad(number, problem)
      if record_hash(record) != record['record_hash']:
        return bad(number, 'record_hash does not match the record (a field was changed)')
      if record['prev_hash'] != prev_hash:
        if number == 1:
          return bad(number, 'prev_hash is not the genesis hash (the first record was removed)')
        return bad(number, 'prev_hash does not match the previous record (a record was '
                   'removed, inserted or moved)')
      if prev_round is not None and record['round'] != prev_round + 1:
        return bad(number, f'round must be {prev_round + 1}. Found {record["round"]}.')
      prev_hash, prev_round = record['record_hash'], record['round']
      count += 1
  if expected_records is not None and count != expected_records:
    # The line is where the first missing (or first surplus) record is, or would be.
    return bad(min(count, expected_records) + 1,
               f'expected {expected_records} records. Found {count} (records removed from or '
               'added at the end)')
  return VerifyResult(ok=True, records=count, first_bad_line=None, reason='')


def verify_run_dir(run_dir: 'str | os.PathLike[str]') -> VerifyResult:
  """`verify_chain` on run_dir/audit_log.jsonl, with the record count from the privacy ledger.

  The ledger (privacy_ledger.json) is used when present: one record is written per completed
  round, so its rounds_completed is the number of records there must be.
  """
  run_dir = os.fspath(run_dir)
  if not os.path.isdir(run_dir):
    raise AuditError(f'run_dir must be a folder. Found none at {run_dir}.')
  expected = None
  ledger_path = os.path.join(run_dir, ledger.LEDGER_FILENAME)
  if os.path.exists(ledger_path):
    try:
      with open(ledger_path, encoding='utf-8') as f:
        expected = json.load(f)['rounds_completed']
    except (OSError, ValueError, KeyError, TypeError):
      raise AuditError(f'privacy ledger {ledger_path} must be JSON with rounds_completed. '
                       'Found a file without it.') from None
    if not _is_int(expected):
      raise AuditError(f'privacy ledger rounds_completed must be an integer. Found {expected!r}.')
  return verify_chain(os.path.join(run_dir, AUDIT_LOG_FILENAME), expected_records=expected)
