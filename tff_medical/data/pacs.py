"""Images pulled from a hospital's PACS, labelled and decoded as the folder loader.

Two protocols (`protocol`) share everything but the query and the retrieval (`_Client`): the
categorization, the decode, the cache and its pseudonyms, retries with backoff, the report and
the messages.

What is asked of the PACS over DICOMweb (dicomweb-client, `DicomWebClient`):
  * QIDO-RS, series level, one query per modality (the query filter's, or every modality the
    mapping knows), optionally restricted to a StudyDate range and to the studies of a study list
    file, asking only for the attributes the mapping needs (includefield BodyPartExamined,
    StudyDescription, SeriesDescription, NumberOfSeriesRelatedInstances). Results come in pages
    of `page_size`. A PACS may return more attributes than asked; only the mapping's are read and
    the rest of each page is dropped with it.
  * Each series is categorized with the folder loader's `DicomMapping` (dicom_mapping.json) from
    its Modality, BodyPartExamined and descriptions. A series no rule maps is not retrieved: its
    instances are counted as skipped with the folder loader's reason.
  * QIDO-RS instance level (in pages) for the SOP Instance UIDs of a mapped series, then WADO-RS,
    one instance at a time, in its stored transfer syntax. The instance is decoded in memory by
    the folder loader's pixel pipeline (`dicom.read_dicom_image`, which reads only its own tags)
    and dropped: no DICOM file is ever written.

Over DIMSE (pynetdicom, `DimseClient`), for a PACS without DICOMweb: the same per modality as a
C-FIND at SERIES level (Study Root) for the same keys, a C-FIND at IMAGE level for the SOP
Instance UIDs of a mapped series, and a C-GET per instance, whose C-STORE comes back on the
association this process opened (nothing listens). The encoded instance is kept as bytes, never
decoded by pynetdicom, and goes to the same reader. Access control is the PACS's: the called AE
title, and the calling AE title (and host) it lists; a rejected association is a ConfigError.

What is stored (the site's `cache_dir`, 0700, every file 0600 from creation): the decoded
64x64 uint8 image of each instance, as .npy, and the fixed skip reason of an instance that could
not be decoded, each named by a pseudonym: an HMAC-SHA256 of the instance's UIDs under a random
key kept in the same folder (`key`). The next run finds its images there without retrieving them
again; the PACS, and nobody without the key, can link a pseudonym back to an instance. Labels are
not stored: each run categorizes from its own query, so a changed mapping takes effect at once.

What is never stored or shown: DICOM headers, UIDs, patient names or IDs, dates, accession
numbers, institution names. Skipped instances are reported as 'instance #n', n being the position
in this run's query results; errors quote the PACS URL and a fixed reason, never a response body
or a request URL (which holds UIDs). The loggers of dicomweb-client, requests/urllib3, pynetdicom
and pydicom, which log request URLs, identifiers and header values, are silenced for the duration
of a load.

Failures: a request that fails (connection error, timeout, HTTP 408/429/5xx) is retried with
exponential backoff (`max_attempts`, `backoff_seconds`); an instance that still fails is reported
and skipped ('PACS retrieval failed') and is retried on the next run. Wrong credentials, a TLS
certificate the CA bundle does not trust and an unreachable PACS end the load with one message
(ConfigError or DataError); a query that matches no usable image is a DataError that says so.

Memory: one instance's bytes and one page of query results at a time (over DIMSE, the matches
of one C-FIND: a few short strings a series), plus the 4 KiB decoded image of each instance kept
(measured in docs/PACS.md).
"""

import contextlib
import dataclasses
import enum
import hashlib
import hmac
import io
import ipaddress
import logging as std_logging
import os
import re
import stat
import time
from typing import Any, Callable, Iterator, Mapping, Optional
import urllib.parse
import warnings

from absl import logging
import numpy as np

from tff_medical import categories
from tff_medical.data import dicom
from tff_medical.data import limits as limits_lib
from tff_medical.data import source
from tff_medical import errors
from tff_medical.errors import ConfigError
from tff_medical.errors import DataError
from tff_medical import fileio

REASON_RETRIEVE_FAILED = 'PACS retrieval failed'
REASON_NOT_FOUND = 'not found on the PACS'
REASON_QUERY_FAILED = 'PACS query failed'
REASON_DUPLICATE = 'listed twice by the PACS'
# Cached decodes are valid for this pipeline version; bump it when the pixel pipeline changes.
_CACHE_VERSION = b'tff-medical-pacs-v1'
_KEY_FILE = 'key'
_IMAGES_DIR = 'images'
_SKIPPED_DIR = 'skipped'
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_UID = re.compile(r'[0-9]+(\.[0-9]+)*')
_DATE_RANGE = re.compile(r'(\d{8})?(-(\d{8})?)?')
_MODALITY = re.compile(r'[A-Z0-9]{1,16}')
_QUIET_LOGGERS = ('dicomweb_client', 'urllib3', 'requests', 'pydicom', 'pynetdicom')
PROTOCOLS = ('dicomweb', 'dimse')
# An AE title: 1 to 16 characters of the default repertoire, no backslash, not only spaces.
_AE_TITLE = re.compile(r'(?=.*[^ ])[\x20-\x5b\x5d-\x7e]{1,16}')

# DICOM JSON tags read from query results, and nothing else.
_TAG_MODALITY = '00080060'
_TAG_BODY_PART = '00180015'
_TAG_STUDY_DESCRIPTION = '00081030'
_TAG_SERIES_DESCRIPTION = '0008103E'
_TAG_STUDY_UID = '0020000D'
_TAG_SERIES_UID = '0020000E'
_TAG_SOP_UID = '00080018'
_TAG_NUM_INSTANCES = '00201209'
_SERIES_FIELDS = ('BodyPartExamined', 'StudyDescription', 'SeriesDescription',
                  'NumberOfSeriesRelatedInstances')


class Auth(enum.Enum):
  """How the site authenticates to the PACS."""
  BASIC = 'basic'  # credentials hold 'user:password'
  BEARER = 'bearer'  # credentials hold a token
  NONE = 'none'


@dataclasses.dataclass(frozen=True)
class PacsSettings:
  """Where the PACS is, how to reach it, what to ask it for and where to cache; validated.

  Attributes:
    url: the DICOMweb root, e.g. https://pacs.example.org/dicom-web (Orthanc: <orthanc>/dicom-web);
      with protocol 'dimse', dicom://HOST:PORT of the PACS's DICOM port.
    protocol: 'dicomweb' (QIDO-RS/WADO-RS) or 'dimse' (C-FIND/C-GET, for a PACS without
      DICOMweb).
    called_ae: dimse: the PACS's AE title.
    calling_ae: dimse: this site's AE title, as the PACS lists it among its allowed modalities.
    cache_dir: this site's cache folder (created 0700; an existing one must be owner-only).
    auth: 'basic', 'bearer' or 'none' (dicomweb; DIMSE has no credentials: access is by AE
      title and host).
    credentials_file: a file (owner-only) holding 'user:password' (basic) or a token (bearer).
    credentials_env: or the name of an environment variable holding the same.
    ca_bundle: PEM file of the CA(s) that sign the PACS's certificate ('' : the system's).
    modalities: modalities to query; () : every modality of the mapping.
    study_date: a DICOM date range: 'YYYYMMDD', 'YYYYMMDD-YYYYMMDD', 'YYYYMMDD-', '-YYYYMMDD'.
    study_list_file: a file of Study Instance UIDs, one a line ('#' comments): only these.
    page_size: query results per request (DICOMweb; a C-FIND has no pages).
    max_attempts, backoff_seconds: a failed request is tried this many times in all, waiting
      backoff_seconds * 2**k before try k + 2.
    timeout_seconds: connect and read timeout of one request.
  """

  url: str
  cache_dir: str
  protocol: str = 'dicomweb'
  called_ae: str = ''
  calling_ae: str = 'TFF-SITE'
  auth: Auth = Auth.BASIC
  credentials_file: str = ''
  credentials_env: str = ''
  ca_bundle: str = ''
  modalities: tuple[str, ...] = ()
  study_date: str = ''
  study_list_file: str = ''
  page_size: int = 100
  max_attempts: int = 4
  backoff_seconds: float = 0.5
  timeout_seconds: float = 30.0

  def __post_init__(self):
    object.__setattr__(self, 'auth', _parse_auth(self.auth))
    if self.protocol not in PROTOCOLS:
      raise ConfigError(f'pacs.protocol must be one of {", ".join(PROTOCOLS)}. '
                        f'Found {self.protocol!r}.')
    if not isinstance(self.url, str) or not self.url:
      raise ConfigError(f'pacs.url must be set for dataset \'pacs\'. Found {self.url!r}.')
    if self.protocol == 'dimse':
      self._check_dimse()
    else:
      self._check_dicomweb()
    self._check_query()

  def _check_dimse(self):
    try:
      parsed = urllib.parse.urlsplit(self.url)
      port = parsed.port
    except ValueError:  # A port that is not a number, a broken IPv6 address.
      parsed, port = None, None
    if (not port or parsed.scheme != 'dicom' or not parsed.hostname or parsed.username or
        parsed.password or parsed.path not in ('', '/') or parsed.query or parsed.fragment):
      raise ConfigError("pacs.url must be dicom://HOST:PORT (the PACS's DICOM port) for "
                        f"pacs.protocol 'dimse'. Found {self.url!r}.")
    for name in ('called_ae', 'calling_ae'):
      value = getattr(self, name)
      if not isinstance(value, str) or not _AE_TITLE.fullmatch(value):
        raise ConfigError(f"pacs.{name} must be an AE title (1 to 16 characters, no backslash) "
                          f"for pacs.protocol 'dimse'. Found {value!r}.")
    if self.credentials_file or self.credentials_env or self.ca_bundle:
      raise ConfigError("pacs.credentials_file, pacs.credentials_env and pacs.ca_bundle are "
                        "for pacs.protocol 'dicomweb': DIMSE access is by AE title and host "
                        '(pacs.calling_ae), and DICOM TLS is not supported here.')
    # No credentials go over DIMSE, whatever pacs.auth says (its default is 'basic').
    object.__setattr__(self, 'auth', Auth.NONE)

  def _check_dicomweb(self):
    parsed = urllib.parse.urlsplit(self.url)
    if parsed.scheme not in ('http', 'https') or not parsed.hostname:
      raise ConfigError('pacs.url must be an http(s) URL of the DICOMweb root, e.g. '
                        f'https://pacs.example.org/dicom-web. Found {self.url!r}.')
    if parsed.username or parsed.password:
      # The URL is recorded with the run's config; credentials belong in a file or variable.
      raise ConfigError('pacs.url must not hold credentials: use pacs.credentials_file or '
                        'pacs.credentials_env.')
    if parsed.scheme == 'http' and self.auth is not Auth.NONE and not _is_loopback(
        parsed.hostname):
      raise ConfigError(f'pacs.url must use https to send credentials to {parsed.hostname} '
                        '(http would send them in clear). Found an http URL.')
    if self.auth is not Auth.NONE and bool(self.credentials_file) == bool(self.credentials_env):
      raise ConfigError(f'pacs auth {self.auth.value!r} needs exactly one of '
                        'pacs.credentials_file and pacs.credentials_env.')
    if self.auth is Auth.NONE and (self.credentials_file or self.credentials_env):
      raise ConfigError("pacs.credentials_file and pacs.credentials_env need pacs.auth "
                        "'basic' or 'bearer'. Found auth 'none'.")

  def _check_query(self):
    if not isinstance(self.cache_dir, str) or not self.cache_dir:
      raise ConfigError('pacs.cache_dir must be set: the site\'s own folder for decoded '
                        f'images. Found {self.cache_dir!r}.')
    modalities = self.modalities
    if isinstance(modalities, str):
      modalities = tuple(m for m in modalities.replace(' ', '').split(',') if m)
    modalities = tuple(str(m).strip().upper() for m in modalities)
    for m in modalities:
      if not _MODALITY.fullmatch(m):
        raise ConfigError(f'pacs.modalities must be DICOM modality codes (CT, MR, CR, DX...). '
                          f'Found {m!r}.')
    object.__setattr__(self, 'modalities', modalities)
    if self.study_date and (not isinstance(self.study_date, str) or
                            not _DATE_RANGE.fullmatch(self.study_date) or
                            not re.search(r'\d', self.study_date)):
      raise ConfigError('pacs.study_date must be a DICOM date range: YYYYMMDD, '
                        f'YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD. Found {self.study_date!r}.')
    for name in ('page_size', 'max_attempts'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f'pacs.{name} must be a positive integer. Found {value!r}.')
    for name in ('backoff_seconds', 'timeout_seconds'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f'pacs.{name} must be a non-negative number. Found {value!r}.')

  @classmethod
  def from_config(cls, pacs: Any) -> 'PacsSettings':
    """From `config.pacs` (a ConfigDict or dict of the fields above) or a PacsSettings."""
    if isinstance(pacs, PacsSettings):
      return pacs
    if pacs is None:
      raise ConfigError("dataset 'pacs' needs the pacs settings (pacs.url, pacs.cache_dir, "
                        'credentials).')
    values = pacs.to_dict() if hasattr(pacs, 'to_dict') else dict(pacs)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ConfigError(f'pacs: unknown fields {unknown}. Allowed: {sorted(names)}.')
    return cls(**values)


def _parse_auth(value) -> Auth:
  return errors.parse_enum(Auth, value, 'pacs.auth', ConfigError)


def _is_loopback(host: str) -> bool:
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def default_config_fields() -> dict[str, Any]:
  """The `config.pacs` fields and their defaults (training/config.py)."""
  return {'url': '', 'cache_dir': '', 'protocol': 'dicomweb', 'called_ae': '',
          'calling_ae': 'TFF-SITE', 'auth': 'basic', 'credentials_file': '',
          'credentials_env': '', 'ca_bundle': '', 'modalities': '', 'study_date': '',
          'study_list_file': '', 'page_size': 100, 'max_attempts': 4, 'backoff_seconds': 0.5,
          'timeout_seconds': 30.0}


# --- Credentials, study list -----------------------------------------------------------------


def _private_file_text(path: str, what: str) -> str:
  """The text of an owner-only file; ConfigError (never quoting the content) otherwise."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise ConfigError(f'Cannot read {what} {path}: {e.strerror}.') from None
  if stat.S_IMODE(st.st_mode) & 0o077:
    raise ConfigError(f'{what} {path} is readable by other users (mode '
                      f'{stat.S_IMODE(st.st_mode):04o}): make it owner-only (chmod 600).')
  try:
    data = limits_lib.read_regular_file(path, 64 * 1024)
    return data.decode('utf-8')
  except limits_lib.InputRefused as e:
    raise ConfigError(f'Cannot read {what} {path}: {e.detail or e.reason}.') from None
  except UnicodeDecodeError:
    raise ConfigError(f'{what} {path} is not UTF-8 text.') from None


def _credentials(settings: PacsSettings) -> str:
  if settings.auth is Auth.NONE:
    return ''
  if settings.credentials_file:
    text = _private_file_text(settings.credentials_file, 'pacs.credentials_file')
    where = f'pacs.credentials_file {settings.credentials_file}'
  else:
    text = os.environ.get(settings.credentials_env, '')
    where = f'environment variable {settings.credentials_env} (pacs.credentials_env)'
    if not text:
      raise ConfigError(f'{where} is not set or empty.')
  text = text.strip()
  if not text:
    raise ConfigError(f'{where} is empty.')
  if settings.auth is Auth.BASIC and (':' not in text or '\n' in text):
    raise ConfigError(f"{where} must hold one line 'user:password' for pacs.auth 'basic'.")
  if settings.auth is Auth.BEARER and any(c.isspace() for c in text):
    raise ConfigError(f"{where} must hold one token for pacs.auth 'bearer'.")
  return text


def _study_list(settings: PacsSettings) -> Optional[list[str]]:
  if not settings.study_list_file:
    return None
  path = settings.study_list_file
  try:
    text = limits_lib.read_regular_file(path, 64 * 2**20).decode('utf-8')
  except limits_lib.InputRefused as e:
    raise ConfigError(f'Cannot read pacs.study_list_file {path}: {e.detail or e.reason}.'
                      ) from None
  except UnicodeDecodeError:
    raise ConfigError(f'pacs.study_list_file {path} is not UTF-8 text.') from None
  uids = []
  for number, line in enumerate(text.splitlines(), 1):
    line = line.split('#', 1)[0].strip()
    if not line:
      continue
    if len(line) > 64 or not _UID.fullmatch(line):
      # The line is not quoted: a mistyped line may hold something else than a UID.
      raise ConfigError(f'pacs.study_list_file {path} line {number} is not a Study Instance '
                        'UID (digits and dots, at most 64).')
    uids.append(line)
  if not uids:
    raise ConfigError(f'pacs.study_list_file {path} lists no study.')
  return uids


# --- The cache -------------------------------------------------------------------------------


class InstanceCache:
  """Decoded images and skip reasons by pseudonym, in an owner-only folder (module docstring)."""

  def __init__(self, root: str):
    self.root = os.path.abspath(os.fspath(root))
    try:
      with fileio.owner_only():
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for sub in (_IMAGES_DIR, _SKIPPED_DIR):
          os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
    except OSError as e:
      raise ConfigError(f'Cannot create pacs.cache_dir {self.root}: {e.strerror}.') from None
    for folder in (self.root, os.path.join(self.root, _IMAGES_DIR),
                   os.path.join(self.root, _SKIPPED_DIR)):
      st = os.stat(folder)
      if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or (
          stat.S_IMODE(st.st_mode) & 0o077):
        raise ConfigError(f'pacs.cache_dir {self.root} must be a folder of this user that '
                          f'nobody else can read or write (mode {stat.S_IMODE(st.st_mode):04o}):'
                          ' chmod 700 it, or name a new folder.')
    self._key = self._load_key()

  def _load_key(self) -> bytes:
    path = os.path.join(self.root, _KEY_FILE)
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, 'O_NOFOLLOW', 0),
                   0o600)
    except FileExistsError:
      try:
        key = limits_lib.read_regular_file(path, 64)
      except limits_lib.InputRefused as e:
        raise ConfigError(f'Cannot read the cache key {path}: {e.detail or e.reason}.'
                          ) from None
      if len(key) != 32:
        raise ConfigError(f'The cache key {path} is damaged: remove pacs.cache_dir '
                          f'{self.root} to start a new cache.')
      return key
    key = os.urandom(32)
    with os.fdopen(fd, 'wb') as f:
      f.write(key)
    return key

  def pseudonym(self, study: str, series: str, instance: str) -> str:
    message = b'\0'.join((_CACHE_VERSION, study.encode(), series.encode(), instance.encode()))
    return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]

  def _path(self, sub: str, name: str, suffix: str = '') -> str:
    return os.path.join(self.root, sub, name + suffix)

  def get(self, name: str) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(image, None), (None, skip reason) or (None, None) when not cached or unreadable."""
    try:
      with limits_lib.open_regular_file(self._path(_IMAGES_DIR, name, '.npy'), 1 << 16) as f:
        image = np.load(f, allow_pickle=False)
      size = categories.IMAGE_SIZE
      if image.dtype == np.uint8 and image.shape == (size, size):
        return image, None
    except (limits_lib.InputRefused, ValueError, OSError, EOFError):
      pass
    try:
      reason = limits_lib.read_regular_file(self._path(_SKIPPED_DIR, name), 256).decode()
      if reason in _CACHEABLE_REASONS:
        return None, reason
    except (limits_lib.InputRefused, UnicodeDecodeError):
      pass
    return None, None

  def put_image(self, name: str, image: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(image, np.uint8), allow_pickle=False)
    fileio.write_atomic(self._path(_IMAGES_DIR, name, '.npy'), buffer.getvalue(), mode=0o600)

  def put_skip(self, name: str, reason: str) -> None:
    if reason in _CACHEABLE_REASONS:
      fileio.write_atomic(self._path(_SKIPPED_DIR, name), reason, mode=0o600)


# Reasons that depend on the instance only, so retrying next run would give the same answer.
_CACHEABLE_REASONS = frozenset({
    dicom.REASON_NOT_DICOM, dicom.REASON_UNREADABLE, dicom.REASON_NO_PIXELS,
    dicom.REASON_PHOTOMETRIC, dicom.REASON_UNDECODABLE, dicom.REASON_BAD_PIXELS,
    limits_lib.REASON_TOO_MANY_PIXELS, limits_lib.REASON_PIXEL_DATA_TOO_LARGE,
    limits_lib.REASON_INFLATED_TOO_LARGE, limits_lib.REASON_FILE_TOO_LARGE,
})


# --- Talking to the PACS ---------------------------------------------------------------------


class _Failed(Exception):
  """A request failed (after its retries, where a retry could help); `reason` is fixed text.

  `refused`: the PACS answered with an error no retry fixes (an HTTP 4xx other than 401/403/404,
  a DIMSE failure status).
  """

  def __init__(self, reason: str, refused: bool = False):
    super().__init__(reason)
    self.reason = reason
    self.refused = refused


class _Transient(Exception):
  """One try failed in a way a retry may fix (no connection, timeout, busy); fixed text."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


class _NotFound(Exception):
  pass


class _TooLarge(Exception):
  pass


@contextlib.contextmanager
def _quiet_libraries():
  """Silences the loggers and warnings that quote request URLs (UIDs) or header values."""
  loggers = [std_logging.getLogger(name) for name in _QUIET_LOGGERS]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(std_logging.CRITICAL + 1)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
  """What a series query gives the loader: the mapping's attributes and the UIDs to retrieve."""

  study: str
  series: str
  modality: str
  body_part: str
  descriptions: tuple[str, ...]
  count: Optional[int]  # the PACS's instance count, when it gives one


class _Client:
  """What the loader asks of a PACS, whatever the protocol: series of a modality, instances of
  a series, one instance decoded; with retries and backoff, and errors that quote nothing."""

  # Completes "The PACS at <url> refused the query (<reason>): ...".
  refused_hint = ''

  def __init__(self, settings: PacsSettings, sleep: Callable[[float], None],
               max_instance_bytes: int):
    self.settings = settings
    self._sleep = sleep
    self._max_bytes = max_instance_bytes

  def series(self, modality: str, study: Optional[str]) -> Iterator[SeriesInfo]:
    raise NotImplementedError

  def instances(self, study: str, series: str) -> Iterator[str]:
    raise NotImplementedError

  def retrieve(self, study: str, series: str, instance: str, limits: limits_lib.InputLimits
               ) -> np.ndarray:
    """One instance decoded to the 64x64 model image; raises _Failed, _NotFound or
    dicom.UnusableDicomError."""
    raise NotImplementedError

  def close(self) -> None:
    pass

  def _attempt(self, function: Callable[[], Any]) -> Any:
    """function() once; the protocol's failures as ConfigError, _Failed, _NotFound, _Transient."""
    return function()

  def _reset(self) -> None:
    """Drops what a failed try may have left broken (a DIMSE association)."""

  def _call(self, function: Callable[[], Any]) -> Any:
    """function() with retries and backoff; raises ConfigError, _Failed or _NotFound."""
    attempts = self.settings.max_attempts
    for attempt in range(attempts):
      try:
        return self._attempt(function)
      except _Transient as e:
        failure = e.reason
        self._reset()
      if attempt + 1 < attempts:
        self._sleep(self.settings.backoff_seconds * 2**attempt)
    raise _Failed(f'{failure} after {attempts} attempt{"s" if attempts > 1 else ""}')

  @staticmethod
  def _decode(buffer: io.BytesIO, limits: limits_lib.InputLimits) -> np.ndarray:
    # The folder loader's reader reads only its own tags and applies the input limits.
    buffer.seek(0)
    return dicom.read_dicom_image(buffer, limits=limits)


def _value(item: Mapping[str, Any], tag: str) -> str:
  """One attribute of a DICOM JSON query result as text ('' when absent)."""
  element = item.get(tag) or {}
  values = element.get('Value') or []
  return ' '.join(str(v) for v in values if not isinstance(v, dict))


class DicomWebClient(_Client):
  """The few DICOMweb calls the loader makes (dicomweb-client)."""

  refused_hint = 'is pacs.url its DICOMweb root?'

  def __init__(self, settings: PacsSettings, *, web_client=None,
               sleep: Callable[[float], None] = time.sleep,
               max_instance_bytes: int = limits_lib.DEFAULT_LIMITS.max_file_bytes):
    super().__init__(settings, sleep, max_instance_bytes)
    self._client = web_client if web_client is not None else self._build()

  def _build(self):
    # pylint: disable=g-import-not-at-top
    import requests
    from dicomweb_client import api as dicomweb_api
    # pylint: enable=g-import-not-at-top
    settings = self.settings
    session = requests.Session()
    session.trust_env = False  # No proxy or .netrc from the environment gets the credentials.
    if settings.ca_bundle:
      if not os.path.isfile(settings.ca_bundle):
        raise ConfigError(f'pacs.ca_bundle {settings.ca_bundle} is not a file.')
      session.verify = settings.ca_bundle
    secret = _credentials(settings)
    if settings.auth is Auth.BASIC:
      user, password = secret.split(':', 1)
      session.auth = (user, password)
    elif settings.auth is Auth.BEARER:
      session.headers['Authorization'] = f'Bearer {secret}'
    # Refuses an instance larger than the input limit before its body is read (requests runs
    # response hooks before it reads the content of a non-streamed response).
    session.hooks['response'].append(self._check_size)
    client = dicomweb_api.DICOMwebClient(
        settings.url, session=session,
        timeout=(settings.timeout_seconds, settings.timeout_seconds))
    client.set_http_retry_params(retry=False)  # Retries are ours: they cover connection errors.
    return client

  def _check_size(self, response, *args, **kwargs):
    del args, kwargs
    length = response.headers.get('Content-Length', '')
    if length.isdigit() and int(length) > self._max_bytes:
      response.close()
      raise _TooLarge()
    return response

  def _attempt(self, function: Callable[[], Any]) -> Any:
    import requests  # pylint: disable=g-import-not-at-top
    url = self.settings.url
    try:
      return function()
    except requests.exceptions.SSLError:
      raise ConfigError(f'The TLS certificate of the PACS at {url} is not trusted: set '
                        "pacs.ca_bundle to the hospital's CA bundle (PEM).") from None
    except requests.exceptions.HTTPError as e:
      status = e.response.status_code if e.response is not None else 0
      if status in (401, 403):
        raise ConfigError(f'The PACS at {url} refused the credentials (HTTP {status}): check '
                          'pacs.auth and pacs.credentials_file / pacs.credentials_env.'
                          ) from None
      if status == 404:
        raise _NotFound() from None
      if status not in _RETRYABLE_STATUS:
        raise _Failed(f'HTTP {status}', refused=True) from None
      raise _Transient(f'HTTP {status}') from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
      raise _Transient('timeout' if isinstance(e, requests.exceptions.Timeout)
                       else 'no connection') from None
    except requests.exceptions.RequestException as e:
      raise _Transient(type(e).__name__) from None

  def _pages(self, search: Callable[..., list]) -> Iterator[dict]:
    offset, size = 0, self.settings.page_size
    while True:
      page = self._call(lambda: search(limit=size, offset=offset))
      yield from page
      if len(page) < size:
        return
      offset += len(page)

  def series(self, modality: str, study: Optional[str]) -> Iterator[SeriesInfo]:
    filters = {'Modality': modality}
    if self.settings.study_date:
      filters['StudyDate'] = self.settings.study_date
    for item in self._pages(lambda **page: self._client.search_for_series(
        study_instance_uid=study, fields=list(_SERIES_FIELDS), search_filters=filters,
        **page)):
      count = _value(item, _TAG_NUM_INSTANCES)
      yield SeriesInfo(
          study=_value(item, _TAG_STUDY_UID), series=_value(item, _TAG_SERIES_UID),
          modality=_value(item, _TAG_MODALITY), body_part=_value(item, _TAG_BODY_PART),
          descriptions=(_value(item, _TAG_STUDY_DESCRIPTION),
                        _value(item, _TAG_SERIES_DESCRIPTION)),
          count=int(count) if count.isdigit() else None)

  def instances(self, study: str, series: str) -> Iterator[str]:
    for item in self._pages(lambda **page: self._client.search_for_instances(
        study_instance_uid=study, series_instance_uid=series, fields=['SOPInstanceUID'],
        **page)):
      yield _value(item, _TAG_SOP_UID)

  def retrieve(self, study: str, series: str, instance: str, limits: limits_lib.InputLimits
               ) -> np.ndarray:
    def fetch():
      try:
        ds = self._client.retrieve_instance(study, series, instance,
                                            media_types=(('application/dicom', '*'),))
      except _TooLarge:
        raise dicom.UnusableDicomError(limits_lib.REASON_FILE_TOO_LARGE) from None
      except Exception as e:  # pylint: disable=broad-except
        import requests  # pylint: disable=g-import-not-at-top
        if isinstance(e, requests.exceptions.RequestException):
          raise
        # pydicom could not parse what the PACS sent.
        raise dicom.UnusableDicomError(dicom.REASON_UNREADABLE) from None
      return ds
    ds = self._call(fetch)
    # Back to bytes for the folder loader's reader; the full dataset is dropped here.
    buffer = io.BytesIO()
    try:
      ds.save_as(buffer, enforce_file_format=True)
    except Exception:  # pylint: disable=broad-except
      raise dicom.UnusableDicomError(dicom.REASON_UNREADABLE) from None
    del ds
    return self._decode(buffer, limits)


# DIMSE status codes (PS3.4 C.4): pending, success, and C-GET's "some sub-operations failed".
_PENDING = frozenset({0xFF00, 0xFF01})
_SUCCESS = 0x0000
# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 2 is transient; source 1 (service user) diagnostics.
_REJECTED_TRANSIENT = 2
_CALLING_AE_NOT_RECOGNIZED = 3
_CALLED_AE_NOT_RECOGNIZED = 7


class DimseClient(_Client):
  """C-FIND and C-GET (pynetdicom) on one association this process opens to the PACS.

  C-GET brings the instances back on the same association, so nothing here listens for a
  connection (C-MOVE would need a port the PACS connects to).
  """

  refused_hint = 'does the PACS allow C-FIND and C-GET for pacs.calling_ae?'

  def __init__(self, settings: PacsSettings, *, connect=None,
               sleep: Callable[[float], None] = time.sleep,
               max_instance_bytes: int = limits_lib.DEFAULT_LIMITS.max_file_bytes):
    """`connect(handlers)` returns an association (tests pass a fake); default: the PACS's."""
    super().__init__(settings, sleep, max_instance_bytes)
    self._connect = connect or self._associate
    self._association = None
    self._received: list = []  # The instance (bytes) of the running C-GET, or _TooLarge.

  def _associate(self, handlers):
    # pylint: disable=g-import-not-at-top
    import pynetdicom
    from pynetdicom import sop_class
    from pydicom import uid as pydicom_uid
    # pylint: enable=g-import-not-at-top
    settings = self.settings
    parsed = urllib.parse.urlsplit(settings.url)
    ae = pynetdicom.AE(ae_title=settings.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_seconds
    ae.connection_timeout = settings.timeout_seconds
    ae.add_requested_context(sop_class.StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(sop_class.StudyRootQueryRetrieveInformationModelGet)
    # C-GET's instances come as C-STORE requests to us: every image storage class, in any
    # transfer syntax (the stored one, as over DICOMweb), with us in the SCP role for it.
    roles = []
    for context in pynetdicom.StoragePresentationContexts:
      if 'Image' in pydicom_uid.UID(context.abstract_syntax).name:
        ae.add_requested_context(context.abstract_syntax, pynetdicom.ALL_TRANSFER_SYNTAXES)
        roles.append(pynetdicom.build_role(context.abstract_syntax, scp_role=True))
    return ae.associate(parsed.hostname, parsed.port, ae_title=settings.called_ae,
                        ext_neg=roles, evt_handlers=handlers)

  def _open(self):
    if self._association is not None and self._association.is_established:
      return self._association
    self._association = None
    from pynetdicom import evt  # pylint: disable=g-import-not-at-top
    association = self._connect([(evt.EVT_C_STORE, self._on_store)])
    if association.is_established:
      self._association = association
      return association
    if association.is_rejected:
      rejection = getattr(association.acceptor, 'primitive', None)
      result = getattr(rejection, 'result', None)
      diagnostic = getattr(rejection, 'diagnostic', None)
      if result == _REJECTED_TRANSIENT:
        raise _Transient('association rejected for now (busy)')
      settings = self.settings
      if diagnostic == _CALLING_AE_NOT_RECOGNIZED:
        why = (f'it does not allow calling AE title {settings.calling_ae!r} (pacs.calling_ae) '
               "from this host: ask its administrator to register this site's AE title")
      elif diagnostic == _CALLED_AE_NOT_RECOGNIZED:
        why = f'its AE title is not {settings.called_ae!r}: check pacs.called_ae'
      else:
        why = ('check pacs.called_ae, and that it allows calling AE title '
               f'{settings.calling_ae!r} (pacs.calling_ae)')
      raise ConfigError(f'The PACS at {settings.url} rejected the association: {why}.')
    raise _Transient('no connection')

  def _reset(self) -> None:
    if self._association is not None:
      self._association.abort()
    self._association = None

  def close(self) -> None:
    if self._association is not None and self._association.is_established:
      self._association.release()
    self._association = None

  def _on_store(self, event) -> int:
    """A C-STORE of the running C-GET: the encoded instance is kept in memory, undecoded."""
    data = event.encoded_dataset(include_meta=True)
    if len(data) > self._max_bytes:
      self._received.append(_TooLarge())
      return 0xA700  # Out of resources: the PACS counts it as a failed sub-operation.
    self._received.append(data)
    return _SUCCESS

  def _find(self, level: str, keys: Mapping[str, str], read: Callable[[Any], Any]) -> list:
    """C-FIND; `read` keeps what is needed of each match. All matches are read before the
    association is used again (DIMSE answers one request at a time)."""
    # pylint: disable-next=g-import-not-at-top
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
    query = _dataset(QueryRetrieveLevel=level, **keys)

    def find():
      matches = []
      for status, identifier in self._open().send_c_find(
          query, StudyRootQueryRetrieveInformationModelFind):
        code = status.get('Status') if status else None
        if code is None:  # No answer in time, or the association went down.
          raise _Transient('no answer')
        if code in _PENDING:
          matches.append(read(identifier))
        elif code != _SUCCESS:
          raise _Failed(f'C-FIND status 0x{code:04X}', refused=True)
      return matches
    return self._call(find)

  def series(self, modality: str, study: Optional[str]) -> Iterator[SeriesInfo]:
    keys = {'StudyInstanceUID': study or '', 'SeriesInstanceUID': '', 'Modality': modality,
            'BodyPartExamined': '', 'StudyDescription': '', 'SeriesDescription': '',
            'NumberOfSeriesRelatedInstances': ''}
    if self.settings.study_date:
      keys['StudyDate'] = self.settings.study_date
    def read(identifier):
      count = _text(identifier, 'NumberOfSeriesRelatedInstances')
      return SeriesInfo(
          study=_text(identifier, 'StudyInstanceUID'),
          series=_text(identifier, 'SeriesInstanceUID'),
          modality=_text(identifier, 'Modality'),
          body_part=_text(identifier, 'BodyPartExamined'),
          descriptions=(_text(identifier, 'StudyDescription'),
                        _text(identifier, 'SeriesDescription')),
          count=int(count) if count.isdigit() else None)
    return iter(self._find('SERIES', keys, read))

  def instances(self, study: str, series: str) -> Iterator[str]:
    keys = {'StudyInstanceUID': study, 'SeriesInstanceUID': series, 'SOPInstanceUID': ''}
    return iter(self._find('IMAGE', keys, lambda i: _text(i, 'SOPInstanceUID')))

  def retrieve(self, study: str, series: str, instance: str, limits: limits_lib.InputLimits
               ) -> np.ndarray:
    # pylint: disable-next=g-import-not-at-top
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
    query = _dataset(QueryRetrieveLevel='IMAGE', StudyInstanceUID=study,
                     SeriesInstanceUID=series, SOPInstanceUID=instance)

    def get():
      self._received = []
      final = None
      for status, _ in self._open().send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
        final = status.get('Status') if status else None
        if final is None:
          raise _Transient('no answer')
      received, self._received = self._received, []
      if received and isinstance(received[0], _TooLarge):
        raise dicom.UnusableDicomError(limits_lib.REASON_FILE_TOO_LARGE)
      if received:
        return received[0]
      if final == _SUCCESS:  # Zero sub-operations: nothing matched.
        raise _NotFound()
      # 0xB000: the PACS could not send it (e.g. no context for its SOP class); else a failure.
      raise _Failed(f'C-GET status 0x{final:04X}', refused=True)
    return self._decode(io.BytesIO(self._call(get)), limits)


def _dataset(**keys):
  from pydicom import dataset as pydicom_dataset  # pylint: disable=g-import-not-at-top
  query = pydicom_dataset.Dataset()
  for keyword, value in keys.items():
    setattr(query, keyword, value)
  return query


def _text(identifier, keyword: str) -> str:
  """One attribute of a C-FIND match as text ('' when absent)."""
  value = identifier.get(keyword) if identifier is not None else None
  if value is None:
    return ''
  from pydicom import multival  # pylint: disable=g-import-not-at-top
  if isinstance(value, (list, tuple, multival.MultiValue)):
    return ' '.join(str(v) for v in value)
  return str(value)


def make_client(settings: PacsSettings, max_instance_bytes: int) -> _Client:
  """The client of `settings.protocol`."""
  if settings.protocol == 'dimse':
    return DimseClient(settings, max_instance_bytes=max_instance_bytes)
  return DicomWebClient(settings, max_instance_bytes=max_instance_bytes)


# --- The loader ------------------------------------------------------------------------------


def _progress(total=None):
  import tqdm  # pylint: disable=g-import-not-at-top
  # disable=None: a bar on a terminal, nothing in a log file.
  return tqdm.tqdm(total=total, unit='image', desc='PACS', disable=None, dynamic_ncols=True)


def load_pacs(settings: Any, mapping: Optional[dicom.DicomMapping] = None, *,
              limits: limits_lib.InputLimits = limits_lib.DEFAULT_LIMITS,
              client: Optional[_Client] = None) -> source.LabeledImages:
  """Queries the PACS, retrieves (or reads from the cache) and decodes every mapped instance.

  Args:
    settings: a PacsSettings, or `config.pacs`.
    mapping: the categorization rules; None: the folder loader's default (dicom_mapping.json).
    limits: the input limits (data/limits.py) applied to each retrieved instance.
    client: a DicomWebClient or DimseClient to use instead of one built from `settings`
      (tests).

  Returns:
    The images (N, 64, 64) uint8 in pseudonym order (stable across runs), their labels, and
    the report (retrieved and cached counts in its source line, skips as 'instance #n').

  Raises:
    ConfigError: bad settings, refused credentials or association, untrusted certificate.
    DataError: the PACS is unreachable, refuses the query, or no usable image matched it.
  """
  settings = PacsSettings.from_config(settings)
  limits = limits_lib.check_limits(limits)
  rules = mapping or dicom.DicomMapping.default()
  studies = _study_list(settings)
  cache = InstanceCache(settings.cache_dir)
  if client is None:
    client = make_client(settings, limits.max_file_bytes)
  modalities = settings.modalities or tuple(sorted({m for r in rules.rules for m in r.modalities}))
  report = source.LoadReport(source='PACS')
  images, labels, names = [], [], []
  counts = {'retrieved': 0, 'cached': 0, 'series': 0}
  index = 0  # 'instance #n' in the report: the position in this run's query results.
  seen = set()  # Pseudonyms loaded in this run (32 bytes each).
  answered = False  # Whether any query got an answer: else the PACS is unreachable.
  with _quiet_libraries(), _progress() as bar, contextlib.closing(client):
    for modality in modalities:
      for study in (studies or [None]):
        try:
          for item in client.series(modality, study):
            answered = True
            counts['series'] += 1
            index = _load_series(client, cache, rules, limits, item, index, report, images,
                                 labels, names, counts, bar, seen)
        except _Failed as failure:
          if not answered and failure.refused:
            raise DataError(f'The PACS at {settings.url} refused the query ({failure.reason}): '
                            f'{client.refused_hint}') from None
          if not answered:
            raise DataError(f'The PACS at {settings.url} is unreachable ({failure.reason}): '
                            'check pacs.url and the network.') from None
          # Reachable a moment ago: report this query and go on with the others.
          logging.warning('PACS: a query failed (%s); its series are skipped.', failure.reason)
          report.skip(f'query of modality {modality}', REASON_QUERY_FAILED)
        except _NotFound:
          if study is not None:  # A listed study the PACS does not hold.
            report.skip(f'study #{studies.index(study)} of the study list', REASON_NOT_FOUND)
            continue
          raise DataError(f'The PACS at {settings.url} has no DICOMweb query service there '
                          '(HTTP 404): is pacs.url its DICOMweb root?') from None
        else:
          answered = True
  report.loaded = len(images)
  report.source = (f'PACS ({counts["series"]} series, {counts["retrieved"]} retrieved, '
                   f'{counts["cached"]} from cache)')
  if not images:
    what = 'matched no series' if not counts['series'] else 'gave no usable image'
    raise DataError(f'No usable image from the PACS at {settings.url}: the query '
                    f'(modalities {", ".join(modalities)}'
                    f'{", study_date " + settings.study_date if settings.study_date else ""}'
                    f'{", study list" if studies else ""}) {what}. {report.summary()}.')
  logging.info('%s', report.summary())
  # In pseudonym order, not the PACS's (QIDO promises none): the same instances give the same
  # dataset, so a resumed run finds the same partition.
  order = sorted(range(len(names)), key=names.__getitem__)
  return source.LabeledImages(images=np.stack([images[i] for i in order]),
                              labels=np.array([labels[i] for i in order], np.int32),
                              report=report)


def _load_series(client, cache, rules, limits, item: SeriesInfo, index, report, images, labels,
                 names, counts, bar, seen: set[str]) -> int:
  """Loads one series of a query result; returns the next instance index."""
  study, series = item.study, item.series
  category, reason = rules.category_for(item.modality, item.body_part, item.descriptions)
  if category is None or not study or not series:
    # Not retrieved: counted by the PACS's own instance count, else by listing the series.
    if item.count is not None:
      number = item.count
    else:
      try:
        number = sum(1 for _ in client.instances(study, series)) if study and series else 1
      except (_Failed, _NotFound):
        number = 1
    for _ in range(number):
      report.skip(f'instance #{index}', reason or dicom.REASON_UNREADABLE)
      index += 1
    return index
  label = categories.LABEL_OF[category]
  try:
    for instance in client.instances(study, series):
      name = f'instance #{index}'
      index += 1
      bar.update(1)
      if not instance:
        report.skip(name, dicom.REASON_UNREADABLE)
        continue
      pseudonym = cache.pseudonym(study, series, instance)
      if pseudonym in seen:
        # Listed twice (a series under two patient records, or pages that moved): once is enough.
        report.skip(name, REASON_DUPLICATE)
        continue
      seen.add(pseudonym)
      image, reason = cache.get(pseudonym)
      if image is None and reason is None:
        try:
          image = client.retrieve(study, series, instance, limits)
          counts['retrieved'] += 1
          cache.put_image(pseudonym, image)
        except dicom.UnusableDicomError as skip:
          counts['retrieved'] += 1
          reason = skip.reason
          cache.put_skip(pseudonym, reason)
        except _NotFound:
          reason = REASON_NOT_FOUND
        except _Failed:
          reason = REASON_RETRIEVE_FAILED  # Not cached: the next run tries again.
      else:
        counts['cached'] += 1
      if image is None:
        report.skip(name, reason)
        continue
      images.append(image)
      labels.append(label)
      names.append(pseudonym)
  except (_Failed, _NotFound):
    # The rest of this series cannot be listed; the next run asks again.
    report.skip(f'series #{counts["series"]}', REASON_QUERY_FAILED)
  return index
