"""The compliance items of a run directory or a release bundle, each green or red with its reason.

* budget respected: every category's epsilon_spent (ledger, metrics.csv, audit log) is within
  the policy's epsilon, and the ledger's targets are the policy's;
* ledger consistent: privacy_ledger.json passes `ledger.validate_ledger_json`, each category's
  epsilon recomputed by a fresh dp_accounting accountant from its noise multiplier and rounds
  released matches the ledger (rel 1e-6), so does the client-level epsilon recomputed from the
  categories released per round (metrics.csv), and the ledger agrees with the last audit record
  and metrics row;
* audit chain verified: `audit.verify_run_dir`;
* no patient identifiers: a documented heuristic scan of the run directory
  (`scan_for_identifiers`).

The dashboard (dashboard.py) renders these results; `public_compliance` holds the items that need
no confidential file.
"""

import collections
import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import dp_accounting
import numpy as np

from tff_medical import categories
from tff_medical import run_files
from tff_medical.errors import TffMedicalError
from tff_medical.monitoring import audit as audit_lib
from tff_medical.monitoring import run_reader
from tff_medical.privacy import accounting
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling as sampling_lib
from tff_medical.privacy import shared_noise_calibration as shared_noise

LEDGER_REL_TOL = 1e-6

# Compliance item ids, in display order.
BUDGET_RESPECTED = 'budget_respected'
LEDGER_CONSISTENT = 'ledger_consistent'
AUDIT_CHAIN = 'audit_chain'
NO_IDENTIFIERS = 'no_identifiers'

# Same-figure tolerance where two files should hold the same float (written from one value).
_SAME_TOL = 1e-9

@dataclasses.dataclass(frozen=True)
class Check:
  """One compliance item: `ok` is green, else red with `reason`."""

  id: str
  title: str
  ok: bool
  reason: str

  def to_json_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_budgets(ledger_json: Any,
                  policy: Optional[policy_lib.PrivacyPolicy],
                  metrics_rows: Sequence[Mapping[str, str]] = (),
                  audit_records: Sequence[Mapping[str, Any]] = (),
                  *,
                  targets_from: str = 'the ledger (policy file unreadable)') -> Check:
  """Every category's spend within its budget, in the ledger and in every round's figures.

  Without `policy` the budgets are the ledger's targets; `targets_from` says so in the reason.
  """
  title = 'Every budget respected'
  if not isinstance(ledger_json, Mapping) or not isinstance(ledger_json.get('categories'),
                                                            Mapping):
    return Check(BUDGET_RESPECTED, title, False,
                 'no privacy ledger (privacy_ledger.json): the run has no DP guarantee to check')
  problems = []
  entries = ledger_json['categories']
  for c in categories.CATEGORY_IDS:
    entry = entries.get(c)
    if not isinstance(entry, Mapping):
      problems.append(f'{c}: missing from the ledger')
      continue
    target = run_reader.finite_or_none(entry.get('target_epsilon'))
    if policy is not None:
      policy_epsilon = policy.budget(c).epsilon
      if target is None or not math.isclose(target, policy_epsilon, rel_tol=_SAME_TOL):
        problems.append(f'{c}: ledger target {entry.get("target_epsilon")!r} is not the '
                        f'policy\'s {policy_epsilon:g}')
      target = policy_epsilon
    if target is None:
      problems.append(f'{c}: no target epsilon')
      continue
    spent = run_reader.finite_or_none(entry.get('epsilon_spent'))
    if spent is None:
      problems.append(f'{c}: epsilon_spent {entry.get("epsilon_spent")!r} is not a number')
    elif spent > target:
      problems.append(f'{c}: spent {spent:.6g} > budget {target:g}')
    worst = max((v for v in (run_reader.parse_number(row.get(f'epsilon/{c}', ''))
                             for row in metrics_rows) if v is not None), default=None)
    if worst is not None and worst > target:
      problems.append(f'{c}: metrics.csv shows {worst:.6g} > budget {target:g}')
    spent_logged = [run_reader.finite_or_none((r.get('epsilon_spent') or {}).get(c))
                    for r in audit_records if isinstance(r.get('epsilon_spent'), Mapping)]
    worst = max((v for v in spent_logged if v is not None), default=None)
    if worst is not None and worst > target:
      problems.append(f'{c}: audit log shows {worst:.6g} > budget {target:g}')
  if problems:
    return Check(BUDGET_RESPECTED, title, False, '; '.join(problems))
  where = 'the policy' if policy is not None else targets_from
  return Check(BUDGET_RESPECTED, title, True,
               f'all 6 categories within their budgets from {where}')


@functools.lru_cache(maxsize=256)
def _one_round_rdp(z: float, sampling_json: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(orders, RDP) of one round, from a fresh dp_accounting accountant (not the ledger's code).

  Cached because the page is rebuilt every round: a curve costs ~0.1 s, and RDP composes by
  addition, so n rounds are n times the curve (what RdpAccountant.compose(event, n) computes).
  """
  spec = sampling_lib.SamplingSpec.from_json_dict(json.loads(sampling_json))
  fresh = accounting.make_accountant(accounting.Accountant.RDP, spec.method)
  fresh.compose(accounting.round_event(z, spec))
  return tuple(fresh.orders), tuple(fresh.rdp)


@functools.lru_cache(maxsize=256)
def _accountant_epsilon(groups: tuple[tuple[float, int], ...], sampling_json: str, delta: float,
                        accountant: str) -> float:
  if not groups:
    return 0.0
  if accountant == accounting.Accountant.RDP.value:
    orders, total = None, 0.0
    for z, n in groups:
      orders, curve = _one_round_rdp(z, sampling_json)
      total = total + n * np.asarray(curve)
    return float(dp_accounting.rdp.compute_epsilon(np.asarray(orders), total, delta)[0])
  spec = sampling_lib.SamplingSpec.from_json_dict(json.loads(sampling_json))
  events = [(accounting.round_event(z, spec), n) for z, n in groups]
  return accounting.epsilon(events, delta, accountant)


def _sampling_key(ledger_json: Mapping[str, Any]) -> str:
  sampling = ledger_json['sampling']
  return json.dumps({k: sampling[k] for k in ('method', 'total_clients',
                                              'expected_clients_per_round')}, sort_keys=True)


def _mixed_epsilon(groups: tuple[tuple[float, int, str], ...], delta: float,
                   accountant: str) -> float:
  """Epsilon of (z, rounds, sampling JSON) groups, each round sampled as its own run was."""
  if not groups:
    return 0.0
  if accountant == accounting.Accountant.RDP.value:
    orders, total = None, 0.0
    for z, n, sampling_json in groups:
      orders, curve = _one_round_rdp(z, sampling_json)
      total = total + n * np.asarray(curve)
    return float(dp_accounting.rdp.compute_epsilon(np.asarray(orders), total, delta)[0])
  events = [(accounting.round_event(z, sampling_lib.SamplingSpec.from_json_dict(json.loads(sj))),
             n) for z, n, sj in groups]
  return accounting.epsilon(events, delta, accountant)


def _earlier_groups(ledger_json: Mapping[str, Any], pick) -> tuple[tuple[float, int, str], ...]:
  groups = []
  for run in ledger_json.get('earlier_runs') or ():
    sampling_json = _sampling_key(run)
    groups.extend((float(z), int(n), sampling_json) for z, n in (pick(run) or ()))
  return tuple(groups)


def recompute_category_epsilon(ledger_json: Mapping[str, Any], category_id: str) -> float:
  """A category's epsilon by a fresh dp_accounting accountant, from the ledger's own figures.

  Schema 2: under each relation, the recorded (z, rounds) groups of this run and of every
  earlier run on the same data, composed; the larger relation is the category's figure.
  Schema 1: accounting.epsilon([(accounting.round_event(z, spec), rounds_released)]) with the
  ledger's one z (one calibrated multiplier for the whole run).
  """
  entry = ledger_json['categories'][category_id]
  if ledger_json.get('schema_version', 1) >= 2:
    own = _sampling_key(ledger_json)
    figures = []
    for relation, recorded in entry['relations'].items():
      groups = _earlier_groups(ledger_json, lambda run, r=relation: run.get('spend', {}).get(
          category_id, {}).get(r)) + tuple((float(z), int(n), own) for z, n in recorded['rounds'])
      figures.append(_mixed_epsilon(groups, ledger_json['delta'], ledger_json['accountant']))
    return max(figures)
  groups = ((entry['noise_multiplier'], entry['rounds_released']),)
  if entry['rounds_released'] == 0:
    groups = ()
  return _accountant_epsilon(groups, _sampling_key(ledger_json), ledger_json['delta'],
                             ledger_json['accountant'])


def recompute_client_epsilon(ledger_json: Mapping[str, Any],
                             released: Sequence[Sequence[str]]) -> float:
  """Client-level epsilon from the categories released in each round (one Gaussian a round).

  A round releasing categories with multipliers z_i is one Gaussian with 1/z^2 = sum 1/z_i^2
  (they share the client sample), or 1/z = sum 1/z_i under shared noise; rounds are composed by
  a fresh accountant, after earlier runs on the same data. Like the ledger, the result is raised
  to the largest category epsilon (PLD discretization may invert them).
  """
  mechanism = ledger_json.get('noise_mechanism', shared_noise.NoiseMechanism.PER_CATEGORY_NOISE)
  counts: dict[float, int] = collections.Counter()
  for round_categories in released:
    zs = [ledger_json['categories'][c]['noise_multiplier'] for c in round_categories]
    if zs:
      counts[shared_noise.client_noise_multiplier(zs, mechanism)] += 1
  own = _sampling_key(ledger_json)
  groups = _earlier_groups(ledger_json, lambda run: run.get('client_level')) + tuple(
      (z, n, own) for z, n in sorted(counts.items()))
  client = _mixed_epsilon(groups, ledger_json['delta'], ledger_json['accountant'])
  return max([client] + [e['epsilon_spent'] for e in ledger_json['categories'].values()])


def _released_per_round(metrics_rows: Sequence[Mapping[str, str]]) -> Optional[list[list[str]]]:
  """Categories released in each round, from the released/<c> columns; None if not recorded."""
  released = []
  for row in metrics_rows:
    flags = {c: run_reader.parse_number(row.get(f'released/{c}', ''))
             for c in categories.CATEGORY_IDS}
    if any(v is None for v in flags.values()):
      return None
    released.append([c for c in categories.CATEGORY_IDS if flags[c]])
  return released


def _example_ledger_problems(ledger_json: Mapping[str, Any]) -> list[str]:
  """Example-level ledger: each site's steps recomputed, and the whole = the worst site."""
  problems = []
  worst = {c: 0.0 for c in categories.CATEGORY_IDS}
  for site_id, site in sorted(ledger_json['sites'].items()):
    key = _sampling_key(site)
    for c in categories.CATEGORY_IDS:
      entry = site['categories'][c]
      steps = entry['steps_released']
      try:
        expected = _accountant_epsilon(((entry['noise_multiplier'], steps),) if steps else (),
                                       key, ledger_json['delta'], ledger_json['accountant'])
      except TffMedicalError as e:
        problems.append(f'{site_id} {c}: cannot recompute ({e})')
        continue
      if not math.isclose(entry['epsilon_spent'], expected, rel_tol=LEDGER_REL_TOL, abs_tol=0.0):
        problems.append(f'{site_id} {c}: ledger {entry["epsilon_spent"]:.9g} vs accountant '
                        f'{expected:.9g}')
      worst[c] = max(worst[c], expected)
  for c in categories.CATEGORY_IDS:
    recorded = ledger_json['categories'][c]['epsilon_spent']
    if not math.isclose(recorded, worst[c], rel_tol=LEDGER_REL_TOL, abs_tol=1e-12):
      problems.append(f'{c}: ledger {recorded:.9g} vs worst site {worst[c]:.9g}')
  return problems


def check_ledger(ledger_json: Any,
                 metrics_rows: Sequence[Mapping[str, str]] = (),
                 audit_records: Sequence[Mapping[str, Any]] = ()) -> Check:
  """The ledger is well formed and its figures are what the accountant gives (rel 1e-6)."""
  title = 'Ledger consistent with the accountant'
  if ledger_json is None:
    return Check(LEDGER_CONSISTENT, title, False, 'no privacy ledger (privacy_ledger.json)')
  try:
    ledger_lib.validate_ledger_json(ledger_json)
  except TffMedicalError as e:
    return Check(LEDGER_CONSISTENT, title, False, f'invalid ledger: {e}')
  if ledger_json.get('privacy_unit') == 'example':
    problems = _example_ledger_problems(ledger_json)
    return Check(LEDGER_CONSISTENT, title, not problems, '; '.join(problems) or (
        f'every site\'s epsilon per category matches the accountant over its steps (example '
        f'level; the whole is the worst site, {len(ledger_json["sites"])} sites)'))
  problems = []
  for c in categories.CATEGORY_IDS:
    recorded = ledger_json['categories'][c]['epsilon_spent']
    try:
      expected = recompute_category_epsilon(ledger_json, c)
    except TffMedicalError as e:
      problems.append(f'{c}: cannot recompute ({e})')
      continue
    if not math.isclose(recorded, expected, rel_tol=LEDGER_REL_TOL, abs_tol=0.0):
      problems.append(f'{c}: ledger {recorded:.9g} vs accountant {expected:.9g}')
  rounds = ledger_json['rounds_completed']
  rows = [row for row in metrics_rows if run_reader.parse_number(row['round']) <= rounds]
  released = _released_per_round(rows) if len(rows) == rounds else None
  if released is not None:
    for c in categories.CATEGORY_IDS:
      count = sum(c in r for r in released)
      if count != ledger_json['categories'][c]['rounds_released']:
        problems.append(f'{c}: metrics.csv released it in {count} rounds, ledger says '
                        f'{ledger_json["categories"][c]["rounds_released"]}')
    if not problems:
      try:
        client = recompute_client_epsilon(ledger_json, released)
      except TffMedicalError as e:
        client = None
        problems.append(f'client-level: cannot recompute ({e})')
      if client is not None and not math.isclose(ledger_json['client_level_epsilon'], client,
                                                 rel_tol=LEDGER_REL_TOL):
        problems.append(f'client-level: ledger {ledger_json["client_level_epsilon"]:.9g} vs '
                        f'accountant {client:.9g}')
  # The ledger, the audit record and the metrics row of the last round are written from the
  # same figures; a difference means one of them was edited.
  last_audit = next((r for r in audit_records if r.get('round') == rounds), None)
  if last_audit is not None and isinstance(last_audit.get('epsilon_spent'), Mapping):
    for c in categories.CATEGORY_IDS:
      logged = run_reader.finite_or_none(last_audit['epsilon_spent'].get(c))
      recorded = ledger_json['categories'][c]['epsilon_spent']
      if logged is None or not math.isclose(logged, recorded, rel_tol=_SAME_TOL):
        problems.append(f'{c}: audit record of round {rounds} says {logged!r}, ledger '
                        f'{recorded!r}')
  last_row = next((r for r in metrics_rows if run_reader.parse_number(r['round']) == rounds), None)
  if last_row is not None:
    for c in categories.CATEGORY_IDS:
      logged = run_reader.parse_number(last_row.get(f'epsilon/{c}', ''))
      recorded = ledger_json['categories'][c]['epsilon_spent']
      if logged is not None and not math.isclose(logged, recorded, rel_tol=_SAME_TOL):
        problems.append(f'{c}: metrics.csv round {rounds} says {logged!r}, ledger {recorded!r}')
  if problems:
    return Check(LEDGER_CONSISTENT, title, False, '; '.join(problems))
  checked = 'the 6 categories' + (' and the client level' if released is not None else '')
  return Check(LEDGER_CONSISTENT, title, True,
               f'schema valid; {checked} recomputed by a fresh {ledger_json["accountant"]} '
               f'accountant within rel {LEDGER_REL_TOL:g}; matches '
               f'{"the audit log and metrics" if audit_records else "metrics.csv"}')


def check_audit_chain(run_dir: str) -> Check:
  """`audit.verify_run_dir` with the custodian key: every record's MAC and link, the chain's end
  against the anchor beside the key, and the privacy ledger's rounds and epsilon against the last
  record. Red when broken, keyed with another key, unkeyed (an old log: not tamper-evident), or
  when there is no key to verify with."""
  title = 'Audit chain verified'
  try:
    result = audit_lib.verify_run_dir(run_dir)
  except TffMedicalError as e:  # AuditKeyError included: no key, no verification.
    return Check(AUDIT_CHAIN, title, False, str(e))
  reason = result.describe()
  if result.ok and result.notes:
    reason += '. Not checked: ' + '; '.join(result.notes)
  return Check(AUDIT_CHAIN, title, result.ok, reason)


# The identifier scan: a heuristic, not a proof. It looks for what DICOM metadata leaves behind
# when it leaks into outputs: UIDs under common roots, the keywords and tags of patient
# attributes, DICOM person names (Family^Given) and DICOM files themselves. A clean scan means
# none of these patterns was found, not that the directory is free of personal data.

_BINARY_PATTERNS = (
    # DICOM UIDs: 1.2.840. is the root of DICOM's own UIDs and of most vendors' (ANSI, US);
    # 2.25. is a UUID-derived UID; 1.3.6.1.4.1. an enterprise (IANA) root used by archives.
    (re.compile(rb'(?<![0-9.])1\.2\.840\.[0-9]'), 'a DICOM-like UID (1.2.840.*)'),
    (re.compile(rb'(?<![0-9.])2\.25\.[0-9]{16,}'), 'a UUID-derived DICOM UID (2.25.*)'),
    (re.compile(rb'(?<![0-9.])1\.3\.6\.1\.4\.1\.[0-9]+\.[0-9]+\.[0-9]+'),
     'an enterprise-rooted UID (1.3.6.1.4.1.*)'),
    # Keywords and names of DICOM patient attributes, also as snake_case or with spaces.
    (re.compile(rb"(?i)(?<![a-z])(?:other[ _-]?)?patient(?:'s)?[ _-]?"
                rb'(?:names?|ids?|birth[ _-]?date|address|telephone[ _-]?numbers?|'
                rb"mother'?s?[ _-]?birth[ _-]?name)(?![a-z])"),
     'a DICOM patient attribute keyword (PatientName, PatientID, ...)'),
    (re.compile(rb"(?i)(?<![a-z])(?:referring[ _-]?physician(?:'s)?[ _-]?name|"
                rb'accession[ _-]?number)(?![a-z])'),
     'a DICOM identifying attribute keyword'),
    # Patient module tags (0010,0010) name, (0010,0020) ID, (0010,0030) birth date, (0010,0040)
    # sex; "00100010" is the DICOM JSON model's spelling.
    (re.compile(rb'\(0010,\s*00[1-4]0\)|"0010(?:0010|0020|0030|0040)"'),
     'a DICOM patient tag'),
)
# Only in text files: in binary data a letter, '^' and letters occur by chance.
_PERSON_NAME = re.compile(rb"(?<![A-Za-z])[A-Za-z][A-Za-z'\-]+\^[A-Za-z][A-Za-z'\-]*")
_PERSON_NAME_LABEL = 'a DICOM person-name value (Family^Given)'
_SCAN_BYTES = 64 << 20  # Per file: weights beyond this are numbers, not metadata.
_MAX_FINDINGS = 20


@dataclasses.dataclass(frozen=True)
class Finding:
  """Where an identifier-like pattern is: the matched text is never kept (it may be one)."""

  path: str  # Relative to the run directory.
  line: Optional[int]  # 1-based, for text files.
  kind: str

  def __str__(self):
    where = f'{self.path}:{self.line}' if self.line else self.path
    return f'{where}: {self.kind}'


def _is_dashboard_file(name: str) -> bool:
  # The dashboard republishes what it scanned (and names what it found): scanning it would
  # report its own report. Temp files of an atomic write are skipped for the same reason.
  return name.endswith('.html') and 'dashboard' in name


def scan_for_identifiers(run_dir: str, skip: Iterable[str] = ()) -> list[Finding]:
  """Identifier-like patterns in the files under run_dir (see the comment above)."""
  skip = {os.path.abspath(p) for p in skip}
  # And their temp files from `_write_atomic`.
  skip_prefixes = tuple(f'.{os.path.basename(p)}.' for p in skip) + (
      f'.{run_files.DASHBOARD_FILE}.',)
  findings: list[Finding] = []
  for root, dirs, files in os.walk(run_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, run_dir)
      if (os.path.abspath(path) in skip or _is_dashboard_file(name) or
          name.startswith(skip_prefixes) or os.path.islink(path)):
        continue
      try:
        st = os.stat(path)
      except OSError:
        continue
      # The live page rescans after every round: a file unchanged since the last scan (same
      # inode, size and modification time) keeps its findings instead of being read again.
      key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
      if key not in _scanned:
        try:
          with open(path, 'rb') as f:
            data = f.read(_SCAN_BYTES)
        except OSError:
          continue
        if len(_scanned) >= _SCANNED_LIMIT:
          _scanned.clear()
        _scanned[key] = _scan_bytes(data)
      findings.extend(Finding(rel, line, label) for line, label in _scanned[key])
  return findings


_scanned: dict[tuple, list[tuple[Optional[int], str]]] = {}
_SCANNED_LIMIT = 4096


def _scan_bytes(data: bytes) -> list[tuple[Optional[int], str]]:
  """(line or None, kind) of each identifier-like pattern in one file's bytes."""
  found = []
  if data[128:132] == b'DICM':
    found.append((None, 'a DICOM file (DICM preamble)'))
  is_text = b'\0' not in data[:8192]
  patterns = _BINARY_PATTERNS + (((_PERSON_NAME, _PERSON_NAME_LABEL),) if is_text else ())
  for pattern, label in patterns:
    match = pattern.search(data)
    if match:
      found.append((data.count(b'\n', 0, match.start()) + 1 if is_text else None, label))
  return found


def check_identifiers(run_dir: str, skip: Iterable[str] = (),
                      title: str = 'No patient identifiers in the run directory') -> Check:
  findings = scan_for_identifiers(run_dir, skip)
  if findings:
    shown = '; '.join(str(f) for f in findings[:_MAX_FINDINGS])
    more = f' (and {len(findings) - _MAX_FINDINGS} more)' if len(findings) > _MAX_FINDINGS else ''
    return Check(NO_IDENTIFIERS, title, False, f'found {shown}{more}')
  return Check(NO_IDENTIFIERS, title, True,
               'no DICOM UID, patient attribute, patient tag, person-name value or DICOM file '
               'found (heuristic scan)')


def compliance(run_dir: str, skip: Iterable[str] = ()) -> list[Check]:
  """The four compliance items of a run directory, in display order."""
  ledger_json, problem = run_reader.read_json(os.path.join(run_dir, run_files.LEDGER_FILE))
  rows, _ = run_reader.read_metrics(run_dir)
  records, _ = run_reader.read_audit_records(run_dir)
  run_config, _ = run_reader.read_json(os.path.join(run_dir, run_files.CONFIG_FILE))
  policy, _ = run_reader.load_run_policy(run_config)
  if problem:
    budget = Check(BUDGET_RESPECTED, 'Every budget respected', False, problem)
    ledger_check = Check(LEDGER_CONSISTENT, 'Ledger consistent with the accountant', False,
                         problem)
  else:
    budget = check_budgets(ledger_json, policy, rows, records)
    ledger_check = check_ledger(ledger_json, rows, records)
  return [budget, ledger_check, check_audit_chain(run_dir), check_identifiers(run_dir, skip)]


def public_compliance(bundle_dir: str, skip: Iterable[str] = ()) -> list[Check]:
  """The compliance items anyone holding only the publishable files can check.

  Budgets are the ledger's targets (the policy file and config.json stay with the custodian);
  the ledger is recomputed by a fresh accountant and compared with metrics.csv; the identifier
  scan covers the bundle. The audit chain is the custodian's to verify: the log is confidential.
  """
  ledger_json, problem = run_reader.read_json(os.path.join(bundle_dir, run_files.LEDGER_FILE))
  rows, columns = run_reader.read_metrics(bundle_dir)
  rows = run_reader.publishable_rows(rows, columns)
  if problem:
    budget = Check(BUDGET_RESPECTED, 'Every budget respected', False, problem)
    ledger_check = Check(LEDGER_CONSISTENT, 'Ledger consistent with the accountant', False,
                         problem)
  else:
    budget = check_budgets(ledger_json, None, rows,
                           targets_from='the targets the ledger states')
    ledger_check = check_ledger(ledger_json, rows)
  return [budget, ledger_check,
          check_identifiers(bundle_dir, skip, title='No patient identifiers in the bundle')]
