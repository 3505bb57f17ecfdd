"""The publishable bundle of a finished run: what may leave the data custodian, and nothing else.

What the bundle holds and the checks before it is published: docs/DESIGN.md.
"""

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
from typing import Iterable, Optional, Sequence

from tff_medical import run_files
from tff_medical.errors import TffMedicalError
from tff_medical.monitoring import dashboard

BUNDLE_FORMAT = 'tff_medical-release/1'

# Always in a bundle; a run without them has nothing to publish (or no guarantee to publish).
REQUIRED = (run_files.SAVED_MODEL_DIR, run_files.MODEL_CARD_FILE, run_files.LEDGER_FILE,
            run_files.METRICS_FILE)
# In a bundle when the run has them.
OPTIONAL = (run_files.CLIENT_LEDGER_FILE, run_files.EMPIRICAL_AUDIT_FILE)

# A bundle is for publication: anyone may read it.
FILE_MODE = 0o644
DIR_MODE = 0o755

# Names of per-round timing (metrics.csv had round_seconds; the progress bar round_s). A metric
# column named like a duration is refused as well, whatever the allowlist says.
_TIMING_TOKENS = (b'round_seconds', b'round_time', b'round_duration')
_TIMING_COLUMN = re.compile(r'(?i)(?:^|[/_])(?:seconds?|secs?|time|times|duration|elapsed|'
                            r'wall|latency)(?:$|[/_])')

_SCAN_BYTES = 256 << 20  # Per file; a bundle of this project is a few MB.


class ReleaseError(TffMedicalError):
  """A release that cannot be made: refused input, or a bundle that failed its scan."""


@dataclasses.dataclass(frozen=True)
class Release:
  """What `assemble` wrote."""

  output: str
  files: tuple[str, ...]  # Relative paths, POSIX separators, as in MANIFEST.json.
  dropped_columns: tuple[str, ...]  # metrics.csv columns left out (not publishable).
  client_ids_checked: int  # How many distinct client ids the scan looked for.
  exempt_site_ids: int  # Example level: sites the ledger names by design (see _client_ids).


def _normalize_entry(name: str) -> str:
  if not isinstance(name, str):
    raise ReleaseError(f'include entries must be names of run-directory entries. Found {name!r}.')
  return name.strip().rstrip('/')


def _check_includes(include: Iterable[str]) -> list[str]:
  """Entries the caller wants in the bundle: publishable names only, confidential refused."""
  wanted = []
  for raw in include:
    name = _normalize_entry(raw)
    if not name:
      continue
    if name in run_files.CONFIDENTIAL:
      raise ReleaseError(
          f'Refusing to include {name}: it is confidential and stays with the data custodian '
          f'({run_files.CONFIDENTIAL_REASONS.get(name, "release boundary")}). Publishable: '
          f'{", ".join(sorted(run_files.PUBLISHABLE))}.')
    if not run_files.is_publishable(name):
      raise ReleaseError(
          f'Refusing to include {name!r}: not a publishable run-directory entry (anything not '
          f'listed as publishable is confidential by default). Publishable: '
          f'{", ".join(sorted(run_files.PUBLISHABLE))}.')
    wanted.append(name)
  return wanted


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_paths(run_dir: str, output: str) -> tuple[str, str]:
  if not isinstance(run_dir, str) or not run_dir:
    raise ReleaseError(f'run_dir must be a run directory. Found {run_dir!r}.')
  if not isinstance(output, str) or not output:
    raise ReleaseError(f'output must be a new folder for the bundle. Found {output!r}.')
  if not os.path.isdir(run_dir):
    raise ReleaseError(f'run_dir must be a folder. Found none at {run_dir}.')
  real_run = os.path.realpath(run_dir)
  real_out = os.path.realpath(output)
  if _inside(real_out, real_run):
    raise ReleaseError(
        f'output must be outside the run directory (a bundle inside it would sit among the '
        f'confidential files). Found {output}, inside {run_dir}.')
  if os.path.lexists(output):
    if os.path.islink(output) or not os.path.isdir(output):
      raise ReleaseError(f'output must be a new or empty folder. Found a file or link at '
                         f'{output}.')
    if os.listdir(output):
      raise ReleaseError(f'output must be a new or empty folder. Found {output} with content.')
  return real_run, real_out


def _check_entry(run_dir: str, name: str) -> None:
  """A publishable entry must be a plain file or a folder of plain files: no link out of it."""
  path = os.path.join(run_dir, name)
  if os.path.islink(path):
    raise ReleaseError(f'{name} in the run directory is a symbolic link; a bundle copies only '
                       'plain files.')
  if name == run_files.SAVED_MODEL_DIR:
    if not os.path.isdir(path):
      raise ReleaseError(f'{name} must be a folder (a SavedModel). Found a file.')
    for root, dirs, files in os.walk(path):
      for child in dirs + files:
        child_path = os.path.join(root, child)
        mode = os.lstat(child_path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
          raise ReleaseError(f'{os.path.relpath(child_path, run_dir)} is not a plain file or '
                             'folder (a link?); a bundle copies only plain files.')
  elif not stat.S_ISREG(os.lstat(path).st_mode):
    raise ReleaseError(f'{name} must be a plain file.')


def _filter_metrics(source: str, target: str) -> list[str]:
  """Copies metrics.csv with only its publishable columns; returns the columns dropped."""
  try:
    with open(source, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      columns = list(reader.fieldnames or [])
      rows = list(reader)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ReleaseError(f'{run_files.METRICS_FILE} is not a readable CSV file: {e}') from None
  if 'round' not in columns:
    raise ReleaseError(f'{run_files.METRICS_FILE} must have a round column. Found '
                       f'{columns[:5]!r}.')
  keep = [c for c in columns if run_files.is_publishable_metric(c) and
          not _TIMING_COLUMN.search(c)]
  out = io.StringIO()
  writer = csv.DictWriter(out, keep, extrasaction='ignore', lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  with open(target, 'w', encoding='utf-8', newline='') as f:
    f.write(out.getvalue())
  return [c for c in columns if c not in keep]


def _read_json_file(path: str, what: str):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ReleaseError(f'{what} is not readable JSON: {e}') from None


def _client_ids(run_dir: str, ledger: object) -> tuple[set[str], set[str]]:
  """Every client id the run knows, and (example level) the site ids its ledger publishes.

  From partition_manifest.json's clients and the audit log's participants (a cross-silo run has
  no manifest; its participants are the sites). At example level the privacy unit is one image
  and the ledger is per site by design: those site ids are exempt from the scan (and reported).
  """
  ids: set[str] = set()
  manifest_path = os.path.join(run_dir, run_files.MANIFEST_FILE)
  if os.path.exists(manifest_path):
    manifest = _read_json_file(manifest_path, run_files.MANIFEST_FILE)
    clients = manifest.get('clients') if isinstance(manifest, dict) else None
    if not isinstance(clients, dict):
      raise ReleaseError(f'{run_files.MANIFEST_FILE} has no clients section: cannot check the '
                         'bundle for client ids.')
    ids.update(str(c) for c in clients)
  records, _ = dashboard.read_audit_records(run_dir)
  for record in records:
    ids.update(str(p) for p in record.get('participants') or ())
  if not ids:
    raise ReleaseError(
        f'Cannot check the bundle for client ids: the run directory has neither '
        f'{run_files.MANIFEST_FILE} nor participants in {run_files.AUDIT_FILE}.')
  exempt: set[str] = set()
  if (isinstance(ledger, dict) and ledger.get('privacy_unit') == 'example' and
      isinstance(ledger.get('sites'), dict)):
    exempt = {str(s) for s in ledger['sites']} & ids
  return ids - exempt, exempt


class _IdScanner:
  """Finds any of many ids inside bytes, also inside longer tokens, in one pass per file.

  A regex alternation of 59,000 ids is too slow; instead, maximal runs of the characters ids are
  made of are found, and each run's substrings of the ids' lengths are looked up in a set.
  """

  def __init__(self, ids: Iterable[str]):
    encoded = {i.encode('utf-8') for i in ids if i}
    self._ids = encoded
    self._lengths = sorted({len(i) for i in encoded})
    alphabet = sorted({bytes([b]) for i in encoded for b in i})
    if encoded:
      klass = b''.join(re.escape(c) for c in alphabet)
      self._runs = re.compile(b'[' + klass + b']{' + str(self._lengths[0]).encode() + b',}')

  def count(self, data: bytes) -> int:
    """How many distinct ids occur in `data`."""
    if not self._ids:
      return 0
    found = set()
    for match in self._runs.finditer(data):
      token = match.group()
      for length in self._lengths:
        if length > len(token):
          break
        for start in range(len(token) - length + 1):
          piece = token[start:start + length]
          if piece in self._ids:
            found.add(piece)
    return len(found)


def _bundle_files(folder: str) -> list[str]:
  paths = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      paths.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/'))
  return paths


def _scan(folder: str, client_ids: set[str]) -> None:
  """Fails if any client id or any per-round timing is in the bundle (names files, not ids)."""
  scanner = _IdScanner(client_ids)
  id_hits, timing_hits = [], []
  for rel in _bundle_files(folder):
    with open(os.path.join(folder, rel), 'rb') as f:
      data = f.read(_SCAN_BYTES)
    found = scanner.count(data)
    if found:
      id_hits.append(f'{rel} ({found} distinct)')
    if any(token in data for token in _TIMING_TOKENS):
      timing_hits.append(rel)
  with open(os.path.join(folder, run_files.METRICS_FILE), newline='', encoding='utf-8') as f:
    header = next(csv.reader(f), [])
  timing_hits += [f'{run_files.METRICS_FILE} column {c}' for c in header
                  if _TIMING_COLUMN.search(c)]
  problems = []
  if id_hits:
    problems.append(f'client ids of the run found in {", ".join(id_hits)}')
  if timing_hits:
    problems.append(f'per-round timing found in {", ".join(timing_hits)}')
  if problems:
    raise ReleaseError('The bundle failed its scan, nothing was published: ' +
                       '; '.join(problems) + '.')


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _write_manifest(folder: str, run_name: str) -> None:
  files = [{'path': rel, 'bytes': os.path.getsize(os.path.join(folder, rel)),
            'sha256': _sha256(os.path.join(folder, rel))} for rel in _bundle_files(folder)]
  payload = {'format': BUNDLE_FORMAT, 'run': run_name, 'files': files}
  with open(os.path.join(folder, run_files.BUNDLE_MANIFEST_FILE), 'w', encoding='utf-8') as f:
    f.write(json.dumps(payload, indent=2, sort_keys=True) + '\n')


def _publish_modes(folder: str) -> None:
  for root, dirs, files in os.walk(folder):
    os.chmod(root, DIR_MODE)
    for name in dirs:
      os.chmod(os.path.join(root, name), DIR_MODE)
    for name in files:
      os.chmod(os.path.join(root, name), FILE_MODE)


def _check_public_compliance(folder: str, dashboard_path: str) -> None:
  failed = [c for c in dashboard.public_compliance(folder, skip=[dashboard_path]) if not c.ok]
  if failed:
    raise ReleaseError('The bundle failed its public compliance checks, nothing was published: ' +
                       '; '.join(f'{c.title}: {c.reason}' for c in failed))


def assemble(run_dir: str, output: str, include: Sequence[str] = ()) -> Release:
  """Writes the publishable bundle of `run_dir` to the new folder `output`; see docs/DESIGN.md.

  Args:
    run_dir: A finished run directory (training/program.py or the cross-silo coordinator) with
      an exported model (saved_model/, model_card.json) and a privacy ledger.
    output: A folder that does not exist or is empty, outside run_dir.
    include: Entries that must be in the bundle (an error if absent); publishable names only.

  Returns:
    What was written.

  Raises:
    ReleaseError: a confidential or unknown entry asked for, output inside run_dir or not
      empty, a required file missing, or a bundle that fails its scan or compliance checks.
      Nothing is written then.
  """
  if isinstance(include, str):
    include = [include]
  wanted = _check_includes(include)
  real_run, real_out = _check_paths(run_dir, output)
  ledger_path = os.path.join(real_run, run_files.LEDGER_FILE)
  if os.path.isfile(ledger_path) and (_read_json_file(ledger_path, run_files.LEDGER_FILE) or {}
                                      ).get('audit_run') is True:
    # Its model carries canary clients (tff_medical/training/canaries.py): never published.
    raise ReleaseError(f'{run_dir} is an audit run (canary clients were inserted; see '
                       'docs/PRIVACY_AUDIT.md): it is never released as a model. Found audit_run '
                       f'true in {run_files.LEDGER_FILE}.')
  missing = [n for n in REQUIRED + tuple(w for w in wanted if w not in REQUIRED)
             if not os.path.lexists(os.path.join(real_run, n))]
  if missing:
    hint = (' (export the model first: experiments/export.py --run_dir=...)'
            if run_files.SAVED_MODEL_DIR in missing or run_files.MODEL_CARD_FILE in missing
            else '')
    raise ReleaseError(f'The run directory lacks {", ".join(missing)}{hint}. Found none in '
                       f'{run_dir}.')
  entries = list(REQUIRED) + [n for n in OPTIONAL if os.path.lexists(os.path.join(real_run, n))]
  entries += [w for w in wanted if w not in entries]
  for name in entries:
    _check_entry(real_run, name)
  ledger = _read_json_file(os.path.join(real_run, run_files.LEDGER_FILE), run_files.LEDGER_FILE)
  client_ids, exempt = _client_ids(real_run, ledger)
  run_name = os.path.basename(real_run)

  parent = os.path.dirname(real_out)
  created = parent  # The outermost folder this call creates, removed again on failure.
  while not os.path.lexists(os.path.dirname(created)) and os.path.dirname(created) != created:
    created = os.path.dirname(created)
  created = None if os.path.lexists(parent) else created
  os.makedirs(parent, exist_ok=True)
  # Private until complete: a reader never sees a half-made or unscanned bundle.
  staging = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(real_out)}.')
  try:
    dropped = []
    for name in entries:
      source = os.path.join(real_run, name)
      target = os.path.join(staging, name)
      if name == run_files.METRICS_FILE:
        dropped = _filter_metrics(source, target)
      elif name == run_files.SAVED_MODEL_DIR:
        # Contents only: the run's (owner-only) modes are not carried over.
        shutil.copytree(source, target, copy_function=shutil.copyfile)
      else:
        shutil.copyfile(source, target)
    dashboard_path = os.path.join(staging, run_files.PUBLIC_DASHBOARD_FILE)
    _check_public_compliance(staging, dashboard_path)
    dashboard.build_dashboard([staging], dashboard_path, public=True, names=[run_name])
    _write_manifest(staging, run_name)
    _scan(staging, client_ids)
    _publish_modes(staging)
    if os.path.isdir(real_out):
      os.rmdir(real_out)  # Empty (checked): rename needs it gone.
    os.rename(staging, real_out)
  except BaseException:
    shutil.rmtree(created or staging, ignore_errors=True)
    raise
  return Release(output=real_out, files=tuple(_bundle_files(real_out)),
                 dropped_columns=tuple(dropped), client_ids_checked=len(client_ids),
                 exempt_site_ids=len(exempt))
