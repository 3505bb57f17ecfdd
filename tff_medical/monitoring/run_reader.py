"""Lenient readers of a run directory's files, for the compliance checks and the dashboard.

Every reader tolerates a missing file (a run before its first round, or a non-DP run without a
ledger) and reports problems instead of raising: a page that refuses to render hides exactly the
run that needs looking at.
"""

import csv
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

from tff_medical import run_files
from tff_medical.errors import TffMedicalError
from tff_medical.privacy import policy as policy_lib


def finite_or_none(value: Any) -> Optional[float]:
  """`value` as a float if it is a finite number (not a bool), else None."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def parse_number(text: str) -> Optional[float]:
  """The finite number `text` spells (a CSV cell), else None."""
  try:
    return finite_or_none(float(text))
  except (TypeError, ValueError):
    return None


def read_metrics(run_dir: str) -> tuple[list[dict[str, str]], list[str]]:
  """metrics.csv rows (raw strings) sorted by round, and the column names in file order."""
  path = os.path.join(run_dir, run_files.METRICS_FILE)
  if not os.path.exists(path):
    return [], []
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    rows = [row for row in reader if parse_number(row.get('round', '')) is not None]
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
  path = os.path.join(run_dir, run_files.AUDIT_FILE)
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
        problems.append(f'{run_files.AUDIT_FILE} line {number} is not a JSON record')
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


def publishable_rows(rows: Sequence[Mapping[str, str]],
                     columns: Sequence[str]) -> list[dict[str, str]]:
  """The rows with only the columns a release may hold (run_files.is_publishable_metric)."""
  # Defence in depth: a public page reads only the columns a release may hold, even from a
  # metrics.csv that was not filtered.
  keep = [c for c in columns if run_files.is_publishable_metric(c)]
  return [{c: row.get(c) for c in keep} for row in rows]
