"""Checks a run's tamper-evident audit log (run_dir/audit_log.jsonl).

  python experiments/verify_audit.py --run_dir=runs/exp1

Prints "audit chain OK: N records" and exits 0, or "audit chain BROKEN at line L: reason" and
exits 1. When run_dir holds privacy_ledger.json, the number of records must equal its
rounds_completed (records cut from the end leave a valid chain otherwise).
"""

import sys

from absl import app
from absl import flags

from tff_medical.errors import TffMedicalError
from tff_medical.monitoring import audit

_RUN_DIR = flags.DEFINE_string('run_dir', None, 'The run folder that holds audit_log.jsonl.')
flags.mark_flag_as_required('run_dir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    result = audit.verify_run_dir(_RUN_DIR.value)
  except TffMedicalError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if result.ok:
    print(f'audit chain OK: {result.records} records')
    return 0
  print(f'audit chain BROKEN at line {result.first_bad_line}: {result.reason}')
  return 1


if __name__ == '__main__':
  app.run(main)
