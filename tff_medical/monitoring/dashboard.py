"""A self-contained HTML dashboard of one or more training runs (run_dir/dashboard.html).

`build_dashboard` reads a run directory's files (metrics.csv, privacy_ledger.json,
audit_log.jsonl, config.json), checks the run's compliance and writes one HTML file that opens
from file:// with no network: the chart library (uPlot, vendor/) and the data (JSON) are inline,
and a Content-Security-Policy forbids the page any request. While `live` is set the page reloads
itself every few seconds; the final write after training clears it.

The compliance panel (`compliance`), each item green or red with its reason:

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

This page is the data custodian's: it shows the audit records (who took part in each round),
participation by client and config.json, so it is confidential (run_files.CONFIDENTIAL) and says
so at its top. `build_dashboard(..., public=True)` renders the page that may be published, from
the publishable files alone (a release bundle, experiments/release.py): accuracy and loss per
category, epsilon against the budgets the ledger states, noise multipliers, clients per round as
counts, clip and update norms, the policy as the ledger records it, and the compliance items that
need no confidential file (budget respected, ledger consistent with the accountant, identifier
scan of the bundle). No audit record, client id, configuration or round timing.
"""

import collections
import csv
import dataclasses
import datetime
import functools
import html
import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import dp_accounting
import numpy as np

from tff_medical import fileio
from tff_medical import categories
from tff_medical import run_files
from tff_medical.errors import TffMedicalError
from tff_medical.monitoring import audit as audit_lib
from tff_medical.privacy import accounting
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling as sampling_lib
from tff_medical.privacy import shared_noise

DASHBOARD_FILENAME = 'dashboard.html'
SELF_CHECK_ID = 'dashboard-self-check'
REFRESH_SECONDS = 10
LATEST_AUDIT_RECORDS = 20
LEDGER_REL_TOL = 1e-6

METRICS_FILE = 'metrics.csv'
CONFIG_FILE = 'config.json'

# Compliance item ids, in display order.
BUDGET_RESPECTED = 'budget_respected'
LEDGER_CONSISTENT = 'ledger_consistent'
AUDIT_CHAIN = 'audit_chain'
NO_IDENTIFIERS = 'no_identifiers'

_VENDOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vendor')
_UPLOT_JS = 'uPlot.iife.min.js'
_UPLOT_CSS = 'uPlot.min.css'

# Same-figure tolerance where two files should hold the same float (written from one value).
_SAME_TOL = 1e-9


class DashboardError(TffMedicalError):
  """A run directory that cannot be shown (missing), or an unusable argument."""


@dataclasses.dataclass(frozen=True)
class Check:
  """One compliance item: `ok` is green, else red with `reason`."""

  id: str
  title: str
  ok: bool
  reason: str

  def to_json_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Reading a run directory. Every reader tolerates a missing file (a run before its first round,
# or a non-DP run without a ledger) and reports problems instead of raising: a dashboard that
# refuses to render hides exactly the run that needs looking at.


def _finite_or_none(value: Any) -> Optional[float]:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def _parse_number(text: str) -> Optional[float]:
  try:
    return _finite_or_none(float(text))
  except (TypeError, ValueError):
    return None


def read_metrics(run_dir: str) -> tuple[list[dict[str, str]], list[str]]:
  """metrics.csv rows (raw strings) sorted by round, and the column names in file order."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    return [], []
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    rows = [row for row in reader if _parse_number(row.get('round', '')) is not None]
    columns = list(reader.fieldnames or [])
  rows.sort(key=lambda row: float(row['round']))
  return rows, columns


def read_json(path: str) -> tuple[Any, Optional[str]]:
  """(parsed JSON or None, problem or None); a missing file is not a problem."""
  if not os.path.exists(path):
    return None, None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f), None
  except (OSError, ValueError) as e:
    return None, f'{os.path.basename(path)} is not readable JSON: {e}'


def read_audit_records(run_dir: str) -> tuple[list[dict[str, Any]], list[str]]:
  """The audit log's records, skipping (and reporting) lines that are not JSON objects.

  Leniency is for display only: `verify_run_dir` judges the log.
  """
  path = os.path.join(run_dir, audit_lib.AUDIT_LOG_FILENAME)
  records, problems = [], []
  if not os.path.exists(path):
    return records, problems
  with open(path, 'rb') as f:
    for number, line in enumerate(f, start=1):
      try:
        record = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
      if isinstance(record, dict):
        records.append(record)
      elif line.strip():
        problems.append(f'{audit_lib.AUDIT_LOG_FILENAME} line {number} is not a JSON record')
  return records, problems


def load_run_policy(
    run_config: Optional[Mapping[str, Any]]) -> tuple[Optional[policy_lib.PrivacyPolicy], str]:
  """The run's privacy policy (config.policy, else the default) and where it came from."""
  path = ''
  if isinstance(run_config, Mapping) and isinstance(run_config.get('config'), Mapping):
    path = run_config['config'].get('policy') or ''
  if not path:
    path = policy_lib.DEFAULT_POLICY_PATH
  elif not os.path.isabs(path) and not os.path.exists(path):
    # A relative path was relative to where training ran; the repository root is the usual one.
    repo_root = os.path.dirname(os.path.dirname(policy_lib.DEFAULT_POLICY_PATH))
    path = os.path.join(repo_root, path)
  try:
    return policy_lib.load_policy(path), path
  except TffMedicalError as e:
    return None, f'{path} ({e})'


# Compliance checks.


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
    target = _finite_or_none(entry.get('target_epsilon'))
    if policy is not None:
      policy_epsilon = policy.budget(c).epsilon
      if target is None or not math.isclose(target, policy_epsilon, rel_tol=_SAME_TOL):
        problems.append(f'{c}: ledger target {entry.get("target_epsilon")!r} is not the '
                        f'policy\'s {policy_epsilon:g}')
      target = policy_epsilon
    if target is None:
      problems.append(f'{c}: no target epsilon')
      continue
    spent = _finite_or_none(entry.get('epsilon_spent'))
    if spent is None:
      problems.append(f'{c}: epsilon_spent {entry.get("epsilon_spent")!r} is not a number')
    elif spent > target:
      problems.append(f'{c}: spent {spent:.6g} > budget {target:g}')
    worst = max((v for v in (_parse_number(row.get(f'epsilon/{c}', ''))
                             for row in metrics_rows) if v is not None), default=None)
    if worst is not None and worst > target:
      problems.append(f'{c}: metrics.csv shows {worst:.6g} > budget {target:g}')
    spent_logged = [_finite_or_none((r.get('epsilon_spent') or {}).get(c))
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
    flags = {c: _parse_number(row.get(f'released/{c}', '')) for c in categories.CATEGORY_IDS}
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
  rows = [row for row in metrics_rows if _parse_number(row['round']) <= rounds]
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
      logged = _finite_or_none(last_audit['epsilon_spent'].get(c))
      recorded = ledger_json['categories'][c]['epsilon_spent']
      if logged is None or not math.isclose(logged, recorded, rel_tol=_SAME_TOL):
        problems.append(f'{c}: audit record of round {rounds} says {logged!r}, ledger '
                        f'{recorded!r}')
  last_row = next((r for r in metrics_rows if _parse_number(r['round']) == rounds), None)
  if last_row is not None:
    for c in categories.CATEGORY_IDS:
      logged = _parse_number(last_row.get(f'epsilon/{c}', ''))
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
  skip_prefixes = tuple(f'.{os.path.basename(p)}.' for p in skip) + (f'.{DASHBOARD_FILENAME}.',)
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
        with open(path, 'rb') as f:
          data = f.read(_SCAN_BYTES)
      except OSError:
        continue
      if data[128:132] == b'DICM':
        findings.append(Finding(rel, None, 'a DICOM file (DICM preamble)'))
      is_text = b'\0' not in data[:8192]
      patterns = _BINARY_PATTERNS + (((_PERSON_NAME, _PERSON_NAME_LABEL),) if is_text else ())
      for pattern, label in patterns:
        match = pattern.search(data)
        if match:
          line = data.count(b'\n', 0, match.start()) + 1 if is_text else None
          findings.append(Finding(rel, line, label))
  return findings


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
  ledger_json, problem = read_json(os.path.join(run_dir, ledger_lib.LEDGER_FILENAME))
  rows, _ = read_metrics(run_dir)
  records, _ = read_audit_records(run_dir)
  run_config, _ = read_json(os.path.join(run_dir, CONFIG_FILE))
  policy, _ = load_run_policy(run_config)
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
  ledger_json, problem = read_json(os.path.join(bundle_dir, ledger_lib.LEDGER_FILENAME))
  rows, columns = read_metrics(bundle_dir)
  rows = _publishable_rows(rows, columns)
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


def _publishable_rows(rows: Sequence[Mapping[str, str]],
                      columns: Sequence[str]) -> list[dict[str, str]]:
  # Defence in depth: a public page reads only the columns a release may hold, even from a
  # metrics.csv that was not filtered.
  keep = [c for c in columns if run_files.is_publishable_metric(c)]
  return [{c: row.get(c) for c in keep} for row in rows]


# The page's data.


def _flatten(value: Any, prefix: str = '') -> list[list[str]]:
  if isinstance(value, Mapping):
    rows = []
    for key in sorted(value):
      rows += _flatten(value[key], f'{prefix}.{key}' if prefix else str(key))
    return rows
  return [[prefix, json.dumps(value, allow_nan=True)]]


def _participation(records: Sequence[Mapping[str, Any]],
                   total_clients: Optional[int]) -> dict[str, Any]:
  times = collections.Counter()
  for record in records:
    for client in record.get('participants') or ():
      times[client] += 1
  rounds = len(records)
  histogram = [0] * (rounds + 1)
  for count in times.values():
    histogram[min(count, rounds)] += 1
  if isinstance(total_clients, int) and total_clients >= len(times):
    histogram[0] = total_clients - len(times)
  return {
      'rounds': [r.get('round') for r in records],
      'clients_per_round': [r.get('num_participants', len(r.get('participants') or ()))
                            for r in records],
      'histogram': histogram,
      'distinct_clients': len(times),
      'total_clients': total_clients,
  }


def _audit_row(record: Mapping[str, Any]) -> dict[str, Any]:
  participants = record.get('participants') or []
  return {
      'round': record.get('round'),
      'time': record.get('time'),
      'num_participants': record.get('num_participants', len(participants)),
      'participants': participants,
      'categories_released': record.get('categories_released'),
      'update_norm': _finite_or_none(record.get('update_norm')),
      'client_level_epsilon': _finite_or_none(record.get('client_level_epsilon')),
      'model_sha256': record.get('model_sha256'),
      'record_hash': record.get('record_hash'),
  }


def _series(rows: Sequence[Mapping[str, str]], columns: Sequence[str]) -> dict[str, list]:
  """Numeric columns as lists aligned with the rounds (None where a round has no value)."""
  out = {}
  for column in columns:
    if column == 'round' or column.endswith('confusion_matrix'):
      continue
    values = [_parse_number(row.get(column) or '') for row in rows]
    if any(v is not None for v in values):
      out[column] = values
  return out


def _with_participants_per_round(series: dict[str, list], rows, records) -> dict[str, list]:
  """The custodian's clients-per-round series, from the audit log (metrics.csv no longer has
  it: the exact sample size is not published)."""
  if 'num_clients' not in series and records:
    by_round = {r.get('round'): r.get('num_participants', len(r.get('participants') or ()))
                for r in records}
    values = [by_round.get(int(float(row['round']))) for row in rows]
    if any(v is not None for v in values):
      series['num_clients'] = values
  return series


def _latest_confusion(rows: Sequence[Mapping[str, str]]) -> Optional[dict[str, Any]]:
  for row in reversed(rows):
    raw = row.get('eval/confusion_matrix')
    if raw:
      try:
        matrix = json.loads(raw)
      except ValueError:
        continue
      return {'round': int(float(row['round'])), 'matrix': matrix}
  return None


def run_data(run_dir: str, name: str, skip: Iterable[str] = ()) -> dict[str, Any]:
  """Everything the page shows of one run, as JSON-able data."""
  problems = []
  rows, columns = read_metrics(run_dir)
  ledger_json, problem = read_json(os.path.join(run_dir, ledger_lib.LEDGER_FILENAME))
  problems += [problem] if problem else []
  run_config, problem = read_json(os.path.join(run_dir, CONFIG_FILE))
  problems += [problem] if problem else []
  records, audit_problems = read_audit_records(run_dir)
  problems += audit_problems
  policy, policy_source = load_run_policy(run_config)
  if policy is None:
    problems.append(f'privacy policy not readable: {policy_source}')
  config_section = run_config.get('config', {}) if isinstance(run_config, Mapping) else {}
  total_clients = (run_config or {}).get('num_clients') if isinstance(run_config,
                                                                      Mapping) else None
  if isinstance(ledger_json, Mapping) and isinstance(ledger_json.get('sampling'), Mapping):
    total_clients = ledger_json['sampling'].get('total_clients', total_clients)
  plan = run_config.get('plan') if isinstance(run_config, Mapping) else None
  checks = compliance(run_dir, skip)
  return {
      'name': name,
      'public': False,
      'path': os.path.abspath(run_dir),
      'dp': bool(config_section.get('dp', ledger_json is not None)),
      'total_rounds': config_section.get('total_rounds'),
      'rounds': [int(float(row['round'])) for row in rows],
      'series': _with_participants_per_round(_series(rows, columns), rows, records),
      'confusion': _latest_confusion(rows),
      'ledger': ledger_json if isinstance(ledger_json, Mapping) else None,
      'policy': None if policy is None else {
          'source': policy_source,
          'delta': policy.delta,
          'categories': [dict(id=b.id, display_name=b.display_name,
                              privacy_level=b.privacy_level.value, epsilon=b.epsilon,
                              noise_level=b.noise_level) for b in policy.budgets],
      },
      'planned_noise_multipliers': (plan or {}).get('noise_multipliers') if isinstance(
          plan, Mapping) else None,
      'config': _flatten(run_config) if isinstance(run_config, Mapping) else [],
      'participation': _participation(records, total_clients),
      'audit_count': len(records),
      'audit_latest': [_audit_row(r) for r in records[-LATEST_AUDIT_RECORDS:]][::-1],
      'compliance': [c.to_json_dict() for c in checks],
      'problems': problems,
  }


def public_run_data(bundle_dir: str, name: str, skip: Iterable[str] = ()) -> dict[str, Any]:
  """What the public page shows of one run, from its publishable files only.

  The same shape as `run_data`, with nothing confidential: no path on the custodian's machine,
  no configuration, no audit record, no participation by client (clients per round stay, as the
  num_clients counts of metrics.csv), and the policy as the ledger records it (each category's
  display name, level, target epsilon and applied noise multiplier). Missing files (an audit
  log, config.json, the manifest, checkpoints: none is in a bundle) are expected.
  """
  problems = []
  rows, columns = read_metrics(bundle_dir)
  columns = [c for c in columns if run_files.is_publishable_metric(c)]
  rows = _publishable_rows(rows, columns)
  ledger_json, problem = read_json(os.path.join(bundle_dir, ledger_lib.LEDGER_FILENAME))
  problems += [problem] if problem else []
  ledger = None
  policy = None
  multipliers = None
  if isinstance(ledger_json, Mapping):
    # An example-level ledger's per-site section stays in the ledger file; the page needs only
    # the whole's figures.
    ledger = {k: v for k, v in ledger_json.items() if k != 'sites'}
    entries = ledger_json.get('categories')
    if isinstance(entries, Mapping):
      known = [(c, entries[c]) for c in categories.CATEGORY_IDS
               if isinstance(entries.get(c), Mapping)]
      policy = {
          'source': f'{ledger_lib.LEDGER_FILENAME} (each category\'s target)',
          'delta': ledger_json.get('delta'),
          'categories': [dict(id=c, display_name=e.get('display_name'),
                              privacy_level=e.get('privacy_level'),
                              epsilon=e.get('target_epsilon'), noise_level=None)
                         for c, e in known],
      }
      multipliers = {c: e.get('noise_multiplier') for c, e in known}
  checks = public_compliance(bundle_dir, skip)
  return {
      'name': name,
      'public': True,
      'path': '',
      'dp': ledger is not None,
      'total_rounds': None,
      'rounds': [int(float(row['round'])) for row in rows],
      'series': _series(rows, columns),
      'confusion': _latest_confusion(rows),
      'ledger': ledger,
      'policy': policy,
      'planned_noise_multipliers': multipliers,
      'config': [],
      'participation': None,
      'audit_count': 0,
      'audit_latest': [],
      'compliance': [c.to_json_dict() for c in checks],
      'problems': problems,
  }


def _run_names(run_dirs: Sequence[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
  for i, name in enumerate(names):
    if names.count(name) > 1:
      parent = os.path.basename(os.path.dirname(os.path.abspath(run_dirs[i])))
      names[i] = f'{parent}/{name}' if parent else f'{name} ({i + 1})'
  return names


def _json_for_script(value: Any) -> str:
  text = json.dumps(value, allow_nan=False, separators=(',', ':'), default=str)
  # Inside <script>, '</script>' or '<!--' in the data would end or hide the element.
  return (text.replace('<', '\\u003c').replace('>', '\\u003e').replace('&', '\\u0026')
          .replace('\u2028', '\\u2028').replace('\u2029', '\\u2029'))


def _sanitize(value: Any) -> Any:
  """NaN and infinities to None: they are not JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {str(k): _sanitize(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_sanitize(v) for v in value]
  return value


def _read_vendor(name: str) -> str:
  with open(os.path.join(_VENDOR_DIR, name), encoding='utf-8') as f:
    return f.read()


def render_html(data: Mapping[str, Any]) -> str:
  """The page for `data` (see `build_dashboard`); one file, no external reference."""
  values = {
      'TITLE': html.escape(data['title']),
      'UPLOT_CSS': _read_vendor(_UPLOT_CSS),
      'PAGE_CSS': _PAGE_CSS,
      'SELF_CHECK_ID': SELF_CHECK_ID,
      'DATA': _json_for_script(_sanitize(data)),
      # '</script' inside a script element would end it early.
      'UPLOT_JS': _read_vendor(_UPLOT_JS).replace('</script', '<\\/script'),
      'PAGE_JS': _PAGE_JS.replace('@@SELF_CHECK_ID@@', SELF_CHECK_ID),
      # In the HTML itself, not drawn by the script: it shows even where scripts do not run.
      'NOTICE': _PUBLIC_NOTICE if data.get('public') else _CONFIDENTIAL_NOTICE,
  }
  # One pass: text from the run (config values, reasons) is never read as a placeholder.
  return re.sub(r'@@([A-Z_]+)@@', lambda m: values[m.group(1)], _PAGE)


def _write_atomic(path: str, text: str, public: bool = False) -> None:
  # A browser reloading mid-write sees the old page or the new one, never half of one. The
  # custodian's page names participants: owner-only whatever the caller's umask.
  fileio.write_atomic(path, text, mode=None if public else 0o600)


def build_dashboard(run_dirs: Sequence[str],
                    output_path: str,
                    live: bool = False,
                    *,
                    refresh_seconds: float = REFRESH_SECONDS,
                    public: bool = False,
                    names: Optional[Sequence[str]] = None) -> str:
  """Writes the dashboard of `run_dirs` to `output_path` (atomically); returns its path.

  Args:
    run_dirs: One or more run directories; several are shown side by side (overlaid curves,
      one colour per run) and each in full.
    output_path: The HTML file to write.
    live: While True the page reloads itself every `refresh_seconds` (a run in progress); the
      final write after training passes False.
    refresh_seconds: The reload period of a live page.
    public: The page that may be published (see the module docstring), built from the
      publishable files alone; the default is the custodian's confidential page.
    names: The runs' names on the page; default: the folders' names.

  Returns:
    output_path.

  Raises:
    DashboardError: no run directory, or one that does not exist, or names that do not match.
  """
  if isinstance(run_dirs, (str, bytes)) or not run_dirs:
    raise DashboardError(f'run_dirs must be a non-empty list of run directories. '
                         f'Found {run_dirs!r}.')
  for run_dir in run_dirs:
    if not os.path.isdir(run_dir):
      raise DashboardError(f'run_dir must be a folder. Found none at {run_dir}.')
  if not (isinstance(refresh_seconds, (int, float)) and refresh_seconds > 0):
    raise DashboardError(f'refresh_seconds must be positive. Found {refresh_seconds!r}.')
  if names is None:
    names = _run_names(run_dirs)
  elif (isinstance(names, (str, bytes)) or len(names) != len(run_dirs) or
        not all(isinstance(n, str) and n for n in names)):
    raise DashboardError(f'names must be one non-empty name per run directory. Found {names!r}.')
  read = public_run_data if public else run_data
  runs = [read(d, n, skip=[output_path]) for d, n in zip(run_dirs, names)]
  data = {
      'title': (('Public dashboard: ' if public else 'Training dashboard (confidential): ') +
                ', '.join(names)),
      'public': bool(public),
      'generated': datetime.datetime.now(datetime.timezone.utc).replace(
          microsecond=0).isoformat().replace('+00:00', 'Z'),
      'live': bool(live),
      'refresh_seconds': refresh_seconds,
      'categories': [{'id': c, 'name': categories.DISPLAY_NAMES[c]}
                     for c in categories.CATEGORY_IDS],
      'runs': runs,
  }
  _write_atomic(output_path, render_html(data), public)
  return output_path


NOTICE_ID = 'boundary-notice'
# Which side of the release boundary a page is on (run_files.py; README "Publishing a run").
_CONFIDENTIAL_NOTICE = f"""<div class="notice confidential" id="{NOTICE_ID}">
<strong>CONFIDENTIAL: participants.</strong> This page shows who took part in each round (audit
records, participation by client) and the run's configuration; it stays with the data custodian.
Publishing it voids the sampling amplification that the privacy ledger assumes. The page that may
be published is the release bundle's public_dashboard.html:
<code>python experiments/release.py --run_dir=&lt;this run&gt; --output=&lt;new folder&gt;</code>
</div>"""
_PUBLIC_NOTICE = f"""<div class="notice public" id="{NOTICE_ID}">
<strong>Public dashboard.</strong> Built from the published files of the run alone (privacy
ledger, evaluation metrics): no participant, no client id, no round timing, no configuration.
The audit log that names each round's participants stays with the data custodian.
</div>"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@@TITLE@@</title>
<style>@@UPLOT_CSS@@</style>
<style>@@PAGE_CSS@@</style>
</head>
<body>
<div id="top"></div>
@@NOTICE@@
<div id="app"></div>
<pre id="@@SELF_CHECK_ID@@" hidden></pre>
<script type="application/json" id="dashboard-data">@@DATA@@</script>
<script>@@UPLOT_JS@@</script>
<script>@@PAGE_JS@@</script>
</body>
</html>
"""

_PAGE_CSS = r"""
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
  background: #f4f6f8; color: #1d2733; }
header { background: #1d3557; color: #fff; padding: 14px 24px; display: flex;
  align-items: center; gap: 16px; flex-wrap: wrap; }
header h1 { font-size: 20px; margin: 0; font-weight: 600; }
header .meta { opacity: .85; font-size: 13px; }
.badge { display: inline-block; padding: 2px 8px; border-radius: 10px; font-size: 12px;
  font-weight: 600; }
.badge.live { background: #e63946; color: #fff; }
.badge.final { background: #2a9d8f; color: #fff; }
.badge.ok { background: #d8f3dc; color: #1b4332; }
.badge.bad { background: #ffd6d6; color: #7f1d1d; }
header button { margin-left: auto; }
main { padding: 16px 24px; }
section.run, section.compare { margin-bottom: 28px; }
h2 { font-size: 18px; margin: 8px 0 12px; }
h2 .path { font-size: 12px; font-weight: normal; color: #5c6b7a; margin-left: 8px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr)); gap: 16px; }
.panel { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.12);
  padding: 12px 14px; min-width: 0; overflow: hidden; }
.panel h3 { font-size: 15px; margin: 0 0 8px; }
.panel .note { font-size: 12px; color: #5c6b7a; margin: 4px 0 0; }
.panel.wide { grid-column: 1 / -1; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 16px; }
.card { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.12);
  padding: 10px 16px; min-width: 150px; }
.card .label { font-size: 12px; color: #5c6b7a; }
.card .value { font-size: 20px; font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e3e8ee;
  vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.nowrap { white-space: nowrap; }
td.mono, span.mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.hscroll { overflow-x: auto; }
.share { background: #e9edf1; border-radius: 4px; height: 10px; width: 80px;
  display: inline-block; vertical-align: middle; overflow: hidden; }
.share > span { display: block; height: 100%; }
ul.compliance { list-style: none; margin: 0; padding: 0; }
ul.compliance li { padding: 8px 10px; border-radius: 6px; margin-bottom: 6px;
  display: flex; gap: 10px; align-items: flex-start; }
ul.compliance li.ok { background: #e8f7ec; }
ul.compliance li.bad { background: #fde8e8; }
ul.compliance .dot { width: 14px; height: 14px; border-radius: 50%; flex: none; margin-top: 3px; }
ul.compliance li.ok .dot { background: #2b9348; }
ul.compliance li.bad .dot { background: #d62828; }
ul.compliance .title { font-weight: 600; }
ul.compliance .reason { font-size: 12px; color: #3d4b59; word-break: break-word; }
.problems { color: #7f1d1d; font-size: 13px; }
details > summary { cursor: pointer; font-weight: 600; }
.scroll { max-height: 360px; overflow: auto; }
.empty { color: #8a97a5; font-style: italic; padding: 20px 0; }
.uplot { font-family: inherit; }
.notice { padding: 10px 24px; font-size: 14px; }
.notice.confidential { background: #fde8e8; color: #7f1d1d; border-bottom: 2px solid #d62828; }
.notice.public { background: #e8f7ec; color: #1b4332; border-bottom: 2px solid #2b9348; }
.notice code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
"""

_PAGE_JS = r"""
'use strict';
(function () {
  var errors = [];
  window.addEventListener('error', function (e) { errors.push(String(e.message || e)); });
  window.addEventListener('unhandledrejection', function (e) { errors.push(String(e.reason)); });

  var DATA = JSON.parse(document.getElementById('dashboard-data').textContent);
  var CAT_COLORS = ['#e63946', '#f4a261', '#2a9d8f', '#457b9d', '#8e44ad', '#6a994e'];
  var RUN_COLORS = ['#1d3557', '#e76f51', '#2a9d8f', '#9b5de5', '#f15bb5', '#00bbf9',
                    '#8d6e63', '#fb8500'];
  var CLIENT_COLOR = '#111111';
  var charts = [];
  window.dashboardCharts = charts;
  var selfCheck = {generated: DATA.generated, live: DATA.live, runs: [], compare: {},
                   errors: errors};

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === 'text') node.textContent = attrs[k];
        else if (k === 'cls') node.className = attrs[k];
        else node.setAttribute(k, attrs[k]);
      });
    }
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === 'string' ?
          document.createTextNode(c) : c);
    });
    return node;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || (typeof v === 'number' && !isFinite(v))) return '—';
    if (typeof v !== 'number') return String(v);
    if (Number.isInteger(v)) return String(v);
    return Number(v.toPrecision(digits || 4)).toString();
  }
  function catName(id) {
    var c = DATA.categories.find(function (x) { return x.id === id; });
    return c ? c.name : id;
  }
  function panel(title, note, wide) {
    var p = el('div', {cls: 'panel' + (wide ? ' wide' : '')}, [el('h3', {text: title})]);
    var body = el('div');
    p.appendChild(body);
    if (note) p.appendChild(el('p', {cls: 'note', text: note}));
    return {node: p, body: body};
  }
  function table(headers, rows, numeric) {
    var t = el('table');
    t.appendChild(el('thead', null, [el('tr', null, headers.map(function (h) {
      return el('th', {text: h});
    }))]));
    var tb = el('tbody');
    rows.forEach(function (r) {
      tb.appendChild(el('tr', null, r.map(function (cell, i) {
        if (cell instanceof Node) return el('td', null, [cell]);
        return el('td', {cls: numeric && numeric[i] ? 'num' : '', text: fmt(cell, 6)});
      })));
    });
    t.appendChild(tb);
    return t;
  }

  // One uPlot chart. series: [{label, values, color, dash, bars, points}]; drag to zoom,
  // double-click to reset, hover for values, click a legend entry to hide or show a series.
  function chart(container, key, xs, series, opts) {
    opts = opts || {};
    var live = series.filter(function (s) {
      return s.values && s.values.some(function (v) { return v !== null && v !== undefined; });
    });
    var info = {series: live.length, rounds: xs.length,
                points: live.reduce(function (m, s) {
                  return Math.max(m, s.values.filter(function (v) {
                    return v !== null && v !== undefined; }).length); }, 0)};
    if (!live.length || !xs.length) {
      container.appendChild(el('div', {cls: 'empty', text: opts.emptyText || 'no data yet'}));
      return info;
    }
    var sparse = live.some(function (s) { return s.values.some(function (v) {
      return v === null || v === undefined; }); });
    var useSeries = [{label: opts.xLabel || 'round'}].concat(live.map(function (s) {
      var one = {label: s.label, stroke: s.color, width: s.width || 2, spanGaps: true,
                 value: function (u, v) { return fmt(v, 5); }};
      if (s.dash) one.dash = s.dash;
      if (s.bars) {
        one.paths = uPlot.paths.bars({size: [0.6, 60]});
        one.fill = s.color + '99';
        one.points = {show: false};
      } else {
        one.points = {show: sparse || xs.length < 12, size: 6, fill: s.color};
      }
      if (s.show === false) one.show = false;
      return one;
    }));
    var width = Math.max(320, (container.clientWidth || 560) - 4);
    var u = new uPlot({
      width: width, height: opts.height || 260,
      series: useSeries,
      scales: {x: {time: false, range: opts.xRange || (live.some(function (s) {
                     return s.bars; }) ? padded : undefined)},
               y: opts.yRange ? {range: opts.yRange} : {}},
      // Rounds and counts are integers: no tick between them.
      axes: [{label: opts.xLabel || 'round', incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500,
                                                     1000, 2000, 5000, 10000],
              values: function (u, ticks) { return ticks.map(function (v) {
                return Number.isInteger(v) ? String(v) : ''; }); }},
             {label: opts.yLabel || '', size: 60}],
      cursor: {drag: {x: true, y: false}},
      legend: {live: true}
    }, [xs].concat(live.map(function (s) { return s.values; })), container);
    u.dashboardKey = key;
    charts.push(u);
    info.legend = container.querySelectorAll('.u-legend .u-series').length - 1;
    return info;
  }
  // Bars are centred on their x: half a step of room at each end.
  function padded(u, min, max) { return [min - 0.5, max + 0.5]; }
  window.addEventListener('resize', function () {
    charts.forEach(function (u) {
      var w = u.root.parentNode.clientWidth;
      if (w > 0) u.setSize({width: Math.max(320, w - 4), height: u.height});
    });
  });

  function seriesOf(run, name) { return run.series[name] || null; }

  function accuracyOrLoss(run, metric) {
    var out = [];
    var train = seriesOf(run, 'train/' + metric);
    out.push({label: 'eval overall', values: seriesOf(run, 'eval/' + metric),
              color: CLIENT_COLOR, width: 3});
    if (train) out.push({label: 'train overall', values: train, color: CLIENT_COLOR,
                         dash: [6, 4], width: 2});
    DATA.categories.forEach(function (c, i) {
      out.push({label: 'eval ' + c.id, values: seriesOf(run, 'eval/' + metric + '/' + c.id),
                color: CAT_COLORS[i]});
      var t = seriesOf(run, 'train/' + metric + '/' + c.id);
      if (t) out.push({label: 'train ' + c.id, values: t, color: CAT_COLORS[i], dash: [6, 4],
                       width: 1.5, show: false});
    });
    return out;
  }

  function complianceList(run) {
    var ul = el('ul', {cls: 'compliance'});
    run.compliance.forEach(function (c) {
      ul.appendChild(el('li', {cls: c.ok ? 'ok' : 'bad', 'data-check': c.id}, [
        el('span', {cls: 'dot'}),
        el('div', null, [el('div', {cls: 'title', text: c.title + (c.ok ? ' — OK' : ' — FAILED')}),
                         el('div', {cls: 'reason', text: c.reason})])
      ]));
    });
    return ul;
  }

  function shareBar(share, color) {
    var pct = Math.max(0, Math.min(1, share || 0)) * 100;
    var bar = el('span', {cls: 'share', title: fmt(share * 100, 4) + '%'},
                 [el('span', {style: 'width:' + pct + '%;background:' + color})]);
    return el('span', null, [bar, ' ' + fmt(share * 100, 3) + '%']);
  }

  function renderRun(run, index, root) {
    var check = {name: run.name, rounds: run.rounds.length, categories: [], panels: {},
                 tables: {}, compliance: {}};
    var section = el('section', {cls: 'run', id: 'run-' + index});
    section.appendChild(el('h2', null, [
      (DATA.runs.length > 1 ? el('span', {style: 'color:' + RUN_COLORS[index %
        RUN_COLORS.length], text: '■ '}) : null),
      'Run ' + run.name, el('span', {cls: 'path', text: run.path})]));
    if (run.problems.length) {
      section.appendChild(el('div', {cls: 'problems'}, run.problems.map(function (p) {
        return el('div', {text: '⚠ ' + p}); })));
    }
    var xs = run.rounds;
    var ledger = run.ledger;
    var lastIdx = xs.length - 1;
    function last(name) {
      var s = seriesOf(run, name);
      if (!s) return null;
      for (var i = s.length - 1; i >= 0; i--) if (s[i] !== null) return s[i];
      return null;
    }
    var active = ledger ? Object.keys(ledger.categories).filter(function (c) {
      return ledger.categories[c].status === 'active'; }).length : null;
    var passed = run.compliance.filter(function (c) { return c.ok; }).length;
    var cards = el('div', {cls: 'cards'}, [
      ['Rounds', xs.length + (run.total_rounds ? ' / ' + run.total_rounds : '')],
      ['Eval accuracy (latest)', fmt(last('eval/accuracy'), 4)],
      ['Client-level ε', ledger ? fmt(ledger.client_level_epsilon, 4) : 'no DP'],
      ['Categories active', ledger ? active + ' / 6' : '—'],
      ['Compliance', passed + ' / ' + run.compliance.length + ' passed']
    ].map(function (kv) {
      return el('div', {cls: 'card'}, [el('div', {cls: 'label', text: kv[0]}),
                                       el('div', {cls: 'value', text: kv[1]})]);
    }));
    section.appendChild(cards);
    var grid = el('div', {cls: 'grid'});
    section.appendChild(grid);

    var comp = panel('Compliance', (run.public ? 'Checked from the published files alone; ' +
      'the audit chain is verified by the data custodian, who holds the log. ' : '') +
      'Identifier check is a heuristic scan of the ' + (run.public ? 'bundle' : 'run directory') +
      ' for DICOM UIDs (1.2.840.*, 2.25.*), patient attribute keywords and tags, ' +
      'Family^Given names and DICOM files; it cannot prove the absence of personal data.');
    comp.body.appendChild(complianceList(run));
    run.compliance.forEach(function (c) { check.compliance[c.id] = c.ok; });
    grid.appendChild(comp.node);

    // Privacy budget table.
    var budget = panel('Privacy budget per category', ledger ?
      'Client-level ε (all categories together): ' + fmt(ledger.client_level_epsilon, 6) +
      ' at δ = ' + ledger.delta + ', ' + ledger.accountant.toUpperCase() + ' accountant, ' +
      ledger.sampling.method + ' sampling of ' + ledger.sampling.expected_clients_per_round +
      ' / ' + ledger.sampling.total_clients + ' clients.' : null);
    if (ledger) {
      var rows = DATA.categories.map(function (c, i) {
        var e = ledger.categories[c.id] || {};
        var share = e.target_epsilon ? e.epsilon_spent / e.target_epsilon : null;
        check.categories.push(c.id);
        return [c.id, e.privacy_level, fmt(e.epsilon_spent, 6) + ' / ' + fmt(e.target_epsilon),
                shareBar(share, CAT_COLORS[i]),
                el('span', {cls: 'badge ' + (e.status === 'active' ? 'ok' : 'bad'),
                            text: e.status}), e.noise_multiplier, e.rounds_released];
      });
      budget.body.appendChild(el('div', {cls: 'hscroll'}, [table(['Category', 'Level',
        'ε spent / budget', 'Share used', 'Status', 'Noise multiplier', 'Rounds released'],
        rows, [0, 0, 1, 0, 0, 1, 1])]));
      check.tables.budget = rows.length;
    } else {
      budget.body.appendChild(el('div', {cls: 'empty',
        text: 'No privacy ledger: this run was trained without differential privacy.'}));
      check.tables.budget = 0;
      DATA.categories.forEach(function (c) { check.categories.push(c.id); });
    }
    grid.appendChild(budget.node);

    function chartPanel(key, title, note, series, opts) {
      var p = panel(title, note);
      grid.appendChild(p.node);
      check.panels[key] = chart(p.body, run.name + ':' + key, xs, series, opts);
    }

    chartPanel('accuracy', 'Accuracy per round', 'Solid: evaluation on the test split ' +
      '(every eval_every rounds); dashed: training (non-DP runs only). Drag to zoom, ' +
      'double-click to reset, click a legend entry to toggle it.',
      accuracyOrLoss(run, 'accuracy'), {yLabel: 'accuracy', yRange: [0, 1]});
    chartPanel('loss', 'Loss per round', null, accuracyOrLoss(run, 'loss'), {yLabel: 'loss'});

    var epsSeries = [];
    var shareSeries = [];
    if (ledger) {
      epsSeries.push({label: 'client-level', values: seriesOf(run, 'client_level_epsilon'),
                      color: CLIENT_COLOR, width: 3});
      DATA.categories.forEach(function (c, i) {
        var spent = seriesOf(run, 'epsilon/' + c.id);
        var target = (ledger.categories[c.id] || {}).target_epsilon;
        epsSeries.push({label: c.id, values: spent, color: CAT_COLORS[i]});
        epsSeries.push({label: c.id + ' budget', values: xs.map(function () { return target; }),
                        color: CAT_COLORS[i], dash: [4, 4], width: 1});
        shareSeries.push({label: c.id, values: spent && spent.map(function (v) {
          return v === null ? null : 100 * v / target; }), color: CAT_COLORS[i]});
      });
    }
    chartPanel('epsilon', 'Privacy budget: ε spent vs budget', 'Solid: ε spent so far; ' +
      'dashed: the category\'s budget; black: client-level ε over all categories.', epsSeries,
      {yLabel: 'ε', emptyText: 'no DP accounting in this run'});
    chartPanel('share', 'Share of budget used (%)', null, shareSeries,
      {yLabel: '% of budget', emptyText: 'no DP accounting in this run'});
    var clipSeries = DATA.categories.map(function (c, i) {
      return {label: c.id, values: seriesOf(run, 'clip_norm/' + c.id), color: CAT_COLORS[i]};
    });
    chartPanel('clip_norm', 'Adaptive clip norm per category', null, clipSeries,
      {yLabel: 'L2 clip norm', emptyText: 'no clipping in this run (non-DP)'});
    chartPanel('update_norm', 'Global model update norm', null,
      [{label: 'update norm', values: seriesOf(run, 'update_norm'), color: RUN_COLORS[0]}],
      {yLabel: 'L2 norm'});
    chartPanel('clients', 'Clients per round', 'Poisson sampling: the number varies around ' +
      'the expected clients per round (from the audit log).',
      [{label: 'clients', values: seriesOf(run, 'num_clients'), color: '#457b9d', bars: true}],
      {yLabel: 'clients', yRange: function (u, min, max) { return [0, Math.max(1, max) * 1.1]; },
       emptyText: 'not published: the exact number of clients a round is not covered by the ' +
         'accountant (a Poisson sample\'s size moves with one client); the expected number is ' +
         'in the ledger, and who took part stays with the data custodian'});

    // Participation distribution (from the audit log's participants): custodian's page only.
    var part = run.participation;
    if (part) {
    var hp = panel('Client participation distribution', 'How many clients took part in k ' +
      'rounds (audit log participants): ' + part.distinct_clients + ' distinct of ' +
      fmt(part.total_clients) + ' clients over ' + part.rounds.length + ' logged rounds.');
    grid.appendChild(hp.node);
    var hx = part.histogram.map(function (_, k) { return k; });
    check.panels.participation = chart(hp.body, run.name + ':participation', hx,
      [{label: 'clients', values: part.histogram, color: '#2a9d8f', bars: true}],
      {xLabel: 'rounds taken part in', yLabel: 'clients',
       yRange: function (u, min, max) { return [0, Math.max(1, max) * 1.1]; }});
    check.panels.participation.rounds = part.rounds.length;
    }

    // Policy table.
    var pol = panel('Privacy policy', run.policy ? 'δ = ' + run.policy.delta + '; source: ' +
      run.policy.source + (run.dp ? '' : '. Not applied: this run was trained without DP.') :
      'The policy file could not be read.');
    if (run.policy && run.public) {
      // As the ledger records it: the policy file itself stays with the custodian.
      var prow = run.policy.categories.map(function (b) {
        var applied = run.planned_noise_multipliers ? run.planned_noise_multipliers[b.id] : null;
        return [b.id + ' (' + b.display_name + ')', b.privacy_level, b.epsilon, applied];
      });
      pol.body.appendChild(table(['Category', 'Privacy level', 'ε budget', 'Noise multiplier'],
        prow, [0, 0, 1, 1]));
      check.tables.policy = prow.length;
    } else if (run.policy) {
      var prow = run.policy.categories.map(function (b) {
        var planned = run.planned_noise_multipliers ? run.planned_noise_multipliers[b.id] : null;
        return [b.id + ' (' + b.display_name + ')', b.privacy_level, b.epsilon, b.noise_level,
                planned];
      });
      pol.body.appendChild(table(['Category', 'Privacy level', 'ε budget', 'Noise level',
        'Planned noise multiplier'], prow, [0, 0, 1, 0, 1]));
      check.tables.policy = prow.length;
    } else {
      check.tables.policy = 0;
    }
    grid.appendChild(pol.node);

    // Confusion matrix of the latest evaluation.
    var cm = panel('Confusion matrix (latest evaluation)', run.confusion ?
      'Round ' + run.confusion.round + '; rows: true category, columns: predicted.' : null);
    if (run.confusion) {
      var m = run.confusion.matrix;
      var max = Math.max.apply(null, [1].concat([].concat.apply([], m)));
      var ct = el('table');
      ct.appendChild(el('tr', null, [el('th', {text: 'true \\ pred'})].concat(
        DATA.categories.map(function (c) { return el('th', {text: c.id}); }))));
      m.forEach(function (row, i) {
        ct.appendChild(el('tr', null, [el('th', {text: DATA.categories[i] ?
          DATA.categories[i].id : String(i)})].concat(row.map(function (v) {
            var a = (v / max * 0.85).toFixed(2);
            return el('td', {cls: 'num', text: String(v),
                             style: 'background: rgba(29,53,87,' + a + ');' +
                                    (v / max > 0.5 ? 'color:#fff' : '')});
          }))));
      });
      cm.body.appendChild(ct);
    } else {
      cm.body.appendChild(el('div', {cls: 'empty', text: 'no evaluation yet'}));
    }
    grid.appendChild(cm.node);

    if (run.public) {
      root.appendChild(section);
      selfCheck.runs.push(check);
      return;
    }

    // Latest audit records.
    var au = panel('Latest audit records', 'Newest first; ' + run.audit_latest.length + ' of ' +
      run.audit_count + ' records. Participants are pseudonymous client ids.', true);
    var arows = run.audit_latest.map(function (r) {
      var ps = r.participants || [];
      var shown = ps.slice(0, 6).join(', ') + (ps.length > 6 ? ', … (+' + (ps.length - 6) +
                                               ')' : '');
      return [r.round, r.time, r.num_participants, el('span', {cls: 'mono', text: shown,
              title: ps.join(', ')}),
              (r.categories_released || []).length + ' / 6', r.update_norm,
              r.client_level_epsilon,
              el('span', {cls: 'mono', text: (r.model_sha256 || '').slice(0, 12),
                          title: r.model_sha256 || ''}),
              el('span', {cls: 'mono', text: (r.record_hash || '').slice(0, 12),
                          title: r.record_hash || ''})];
    });
    var scroll = el('div', {cls: 'scroll'}, [table(['Round', 'Time (UTC)', 'Clients',
      'Participants', 'Released', 'Update norm', 'Client ε', 'Model SHA-256', 'Record hash'],
      arows, [1, 0, 1, 0, 0, 1, 1, 0, 0])]);
    au.body.appendChild(scroll);
    check.tables.audit = arows.length;
    grid.appendChild(au.node);

    // Configuration.
    var cf = panel('Run configuration (config.json)', null, true);
    var det = el('details', null, [el('summary', {text: run.config.length + ' settings'})]);
    det.appendChild(el('div', {cls: 'scroll'}, [table(['Setting', 'Value'],
      run.config.map(function (kv) { return [kv[0], el('span', {cls: 'mono', text: kv[1]})]; }))]));
    cf.body.appendChild(det);
    check.tables.config = run.config.length;
    grid.appendChild(cf.node);

    root.appendChild(section);
    selfCheck.runs.push(check);
  }

  function renderCompare(root) {
    var section = el('section', {cls: 'compare'}, [el('h2', {text: 'Runs side by side'})]);
    var grid = el('div', {cls: 'grid'});
    section.appendChild(grid);
    var all = {};
    DATA.runs.forEach(function (r) { r.rounds.forEach(function (x) { all[x] = true; }); });
    var xs = Object.keys(all).map(Number).sort(function (a, b) { return a - b; });
    function aligned(run, name) {
      var s = run.series[name];
      if (!s) return null;
      var byRound = {};
      run.rounds.forEach(function (x, i) { byRound[x] = s[i]; });
      return xs.map(function (x) { return x in byRound ? byRound[x] : null; });
    }
    function overlay(key, title, name, opts) {
      var p = panel(title);
      grid.appendChild(p.node);
      selfCheck.compare[key] = chart(p.body, 'compare:' + key, xs, DATA.runs.map(function (r, i) {
        return {label: r.name, values: aligned(r, name), color: RUN_COLORS[i % RUN_COLORS.length]};
      }), opts);
    }
    overlay('accuracy', 'Evaluation accuracy', 'eval/accuracy', {yLabel: 'accuracy',
                                                                  yRange: [0, 1]});
    overlay('epsilon', 'Client-level ε', 'client_level_epsilon', {yLabel: 'ε'});
    overlay('loss', 'Evaluation loss', 'eval/loss', {yLabel: 'loss'});
    var p = panel('Compliance by run');
    p.body.appendChild(table(['Run'].concat(DATA.runs[0].compliance.map(function (c) {
      return c.title; })), DATA.runs.map(function (r) {
        return [r.name].concat(r.compliance.map(function (c) {
          return el('span', {cls: 'badge ' + (c.ok ? 'ok' : 'bad'), text: c.ok ? 'OK' : 'FAILED',
                             title: c.reason});
        }));
      })));
    grid.appendChild(p.node);
    root.appendChild(section);
  }

  function header() {
    var h = el('header', null, [
      el('h1', {text: DATA.public ? 'tff_medical public dashboard' :
                                    'tff_medical training dashboard'}),
      el('span', {cls: 'badge ' + (DATA.live ? 'live' : 'final'),
                  text: DATA.live ? 'LIVE — reloads every ' + DATA.refresh_seconds + ' s' :
                                    'final'}),
      el('span', {cls: 'meta', text: 'Updated ' + DATA.generated + ' · ' + DATA.runs.length +
                  (DATA.runs.length > 1 ? ' runs' : ' run')})
    ]);
    if (DATA.live) {
      var paused = false;
      try { paused = sessionStorage.getItem('dashboard-paused') === '1'; } catch (e) {}
      var button = el('button', {type: 'button', text: paused ? 'Resume auto-reload' :
                                                                'Pause auto-reload'});
      button.addEventListener('click', function () {
        paused = !paused;
        try { sessionStorage.setItem('dashboard-paused', paused ? '1' : '0'); } catch (e) {}
        button.textContent = paused ? 'Resume auto-reload' : 'Pause auto-reload';
      });
      h.appendChild(button);
      // Reload while the run is live; keep the scroll position across reloads.
      window.setTimeout(function tick() {
        if (paused) { window.setTimeout(tick, DATA.refresh_seconds * 1000); return; }
        try { sessionStorage.setItem('dashboard-scroll', String(window.scrollY)); } catch (e) {}
        window.location.reload();
      }, DATA.refresh_seconds * 1000);
    }
    return h;
  }

  var app = document.getElementById('app');
  try {
    document.getElementById('top').appendChild(header());
    var main = el('main');
    app.appendChild(main);
    if (DATA.runs.length > 1) renderCompare(main);
    DATA.runs.forEach(function (run, i) { renderRun(run, i, main); });
    try {
      var y = sessionStorage.getItem('dashboard-scroll');
      if (y !== null) window.scrollTo(0, Number(y));
    } catch (e) {}
  } catch (e) {
    errors.push(String(e && e.stack || e));
    app.appendChild(el('pre', {cls: 'problems', text: 'Dashboard failed: ' + e}));
  }
  selfCheck.charts = charts.length;
  selfCheck.resources = performance.getEntriesByType('resource').map(function (r) {
    return r.name; });
  document.getElementById('@@SELF_CHECK_ID@@').textContent = JSON.stringify(selfCheck);
})();
"""
