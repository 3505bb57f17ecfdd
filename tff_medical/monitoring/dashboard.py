"""A self-contained HTML dashboard of one or more training runs (run_dir/dashboard.html).

The custodian's (confidential) page and the public one, and what each shows: docs/DESIGN.md.
"""

import collections
import datetime
import functools
import html
import importlib.resources
import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from tff_medical import categories
from tff_medical import fileio
from tff_medical import run_files
from tff_medical.errors import TffMedicalError
from tff_medical.monitoring import compliance as compliance_lib
from tff_medical.monitoring import run_reader

DASHBOARD_FILENAME = run_files.DASHBOARD_FILE
SELF_CHECK_ID = 'dashboard-self-check'
NOTICE_ID = 'boundary-notice'
REFRESH_SECONDS = 10
LATEST_AUDIT_RECORDS = 20

METRICS_FILE = run_files.METRICS_FILE
CONFIG_FILE = run_files.CONFIG_FILE

# The compliance items and the run-directory readers, under the names callers have used.
Check = compliance_lib.Check
Finding = compliance_lib.Finding
BUDGET_RESPECTED = compliance_lib.BUDGET_RESPECTED
LEDGER_CONSISTENT = compliance_lib.LEDGER_CONSISTENT
AUDIT_CHAIN = compliance_lib.AUDIT_CHAIN
NO_IDENTIFIERS = compliance_lib.NO_IDENTIFIERS
LEDGER_REL_TOL = compliance_lib.LEDGER_REL_TOL
check_budgets = compliance_lib.check_budgets
check_ledger = compliance_lib.check_ledger
check_audit_chain = compliance_lib.check_audit_chain
check_identifiers = compliance_lib.check_identifiers
scan_for_identifiers = compliance_lib.scan_for_identifiers
recompute_category_epsilon = compliance_lib.recompute_category_epsilon
recompute_client_epsilon = compliance_lib.recompute_client_epsilon
compliance = compliance_lib.compliance
public_compliance = compliance_lib.public_compliance
read_metrics = run_reader.read_metrics
read_json = run_reader.read_json
read_audit_records = run_reader.read_audit_records
load_run_policy = run_reader.load_run_policy

# The page's HTML, CSS and JS (package data beside the vendored chart library).
_TEMPLATES = 'templates'
_VENDOR = 'vendor'
_UPLOT_JS = 'uPlot.iife.min.js'
_UPLOT_CSS = 'uPlot.min.css'


class DashboardError(TffMedicalError):
  """A run directory that cannot be shown (missing), or an unusable argument."""


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
      'update_norm': run_reader.finite_or_none(record.get('update_norm')),
      'client_level_epsilon': run_reader.finite_or_none(record.get('client_level_epsilon')),
      'model_sha256': record.get('model_sha256'),
      'record_hash': record.get('record_hash'),
  }


def _series(rows: Sequence[Mapping[str, str]], columns: Sequence[str]) -> dict[str, list]:
  """Numeric columns as lists aligned with the rounds (None where a round has no value)."""
  out = {}
  for column in columns:
    if column == 'round' or column.endswith('confusion_matrix'):
      continue
    values = [run_reader.parse_number(row.get(column) or '') for row in rows]
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
  rows, columns = run_reader.read_metrics(run_dir)
  ledger_json, problem = run_reader.read_json(os.path.join(run_dir, run_files.LEDGER_FILE))
  problems += [problem] if problem else []
  run_config, problem = run_reader.read_json(os.path.join(run_dir, CONFIG_FILE))
  problems += [problem] if problem else []
  records, audit_problems = run_reader.read_audit_records(run_dir)
  problems += audit_problems
  policy, policy_source = run_reader.load_run_policy(run_config)
  if policy is None:
    problems.append(f'privacy policy not readable: {policy_source}')
  config_section = run_config.get('config', {}) if isinstance(run_config, Mapping) else {}
  total_clients = (run_config or {}).get('num_clients') if isinstance(run_config,
                                                                      Mapping) else None
  if isinstance(ledger_json, Mapping) and isinstance(ledger_json.get('sampling'), Mapping):
    total_clients = ledger_json['sampling'].get('total_clients', total_clients)
  plan = run_config.get('plan') if isinstance(run_config, Mapping) else None
  checks = compliance_lib.compliance(run_dir, skip)
  # An audit run's claimed vs empirical epsilon (tff_medical.training.canaries); absent otherwise.
  empirical, problem = run_reader.read_json(os.path.join(run_dir, run_files.EMPIRICAL_AUDIT_FILE))
  problems += [problem] if problem else []
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
      'empirical_audit': empirical if isinstance(empirical, Mapping) else None,
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
  rows, columns = run_reader.read_metrics(bundle_dir)
  columns = [c for c in columns if run_files.is_publishable_metric(c)]
  rows = run_reader.publishable_rows(rows, columns)
  ledger_json, problem = run_reader.read_json(os.path.join(bundle_dir, run_files.LEDGER_FILE))
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
          'source': f'{run_files.LEDGER_FILE} (each category\'s target)',
          'delta': ledger_json.get('delta'),
          'categories': [dict(id=c, display_name=e.get('display_name'),
                              privacy_level=e.get('privacy_level'),
                              epsilon=e.get('target_epsilon'), noise_level=None)
                         for c, e in known],
      }
      multipliers = {c: e.get('noise_multiplier') for c, e in known}
  checks = compliance_lib.public_compliance(bundle_dir, skip)
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


@functools.lru_cache(maxsize=None)
def _package_text(folder: str, name: str) -> str:
  """A text file shipped in this package (setup.py package_data), read once per process."""
  return importlib.resources.files(__package__).joinpath(folder, name).read_text(encoding='utf-8')


def render_html(data: Mapping[str, Any]) -> str:
  """The page for `data` (see `build_dashboard`); one file, no external reference."""
  # In the HTML itself, not drawn by the script: it shows even where scripts do not run.
  notice = _package_text(_TEMPLATES, 'notice_public.html' if data.get('public') else
                         'notice_confidential.html')
  values = {
      'TITLE': html.escape(data['title']),
      'UPLOT_CSS': _package_text(_VENDOR, _UPLOT_CSS),
      'PAGE_CSS': _package_text(_TEMPLATES, 'dashboard.css'),
      'SELF_CHECK_ID': SELF_CHECK_ID,
      'DATA': _json_for_script(_sanitize(data)),
      # '</script' inside a script element would end it early.
      'UPLOT_JS': _package_text(_VENDOR, _UPLOT_JS).replace('</script', '<\\/script'),
      'PAGE_JS': _package_text(_TEMPLATES, 'dashboard.js').replace('@@SELF_CHECK_ID@@',
                                                                    SELF_CHECK_ID),
      'NOTICE': notice.replace('@@NOTICE_ID@@', NOTICE_ID),
  }
  # One pass: text from the run (config values, reasons) is never read as a placeholder.
  return re.sub(r'@@([A-Z_]+)@@', lambda m: values[m.group(1)],
                _package_text(_TEMPLATES, 'dashboard.html'))


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
    public: The page that may be published (see docs/DESIGN.md), built from the
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
