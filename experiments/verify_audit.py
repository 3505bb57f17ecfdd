"""Checks a run's tamper-evident audit log (run_dir/audit_log.jsonl) with the custodian's key.

  python experiments/verify_audit.py --run_dir=runs/exp1 [--key_file=PATH]
      [--expected_rounds=N] [--expected_head='{"round": 3, "mac": "..."}']

Every record's HMAC is checked with the key (default: $TFF_MEDICAL_AUDIT_KEY_FILE, else
~/.config/tff_medical/audit.key), then the end of the chain against the anchor kept beside the
key, the privacy ledger (its rounds_completed and epsilon), and what is passed here.

Prints "audit log OK: ..." and exits 0; otherwise one line saying which line (and round) is
wrong and why, and exits 1: "audit log broken at line L (round R): ...", "audit log wrong key:
..." or, for a log written before records were keyed, "audit log unkeyed (not tamper-evident):
...". Lines starting "not checked:" say what could not be checked.
"""

import json
import sys

from absl import app
from absl import flags

from tff_medical.errors import TffMedicalError
from tff_medical.monitoring import audit

_RUN_DIR = flags.DEFINE_string('run_dir', None, 'The run folder that holds audit_log.jsonl.')
_KEY_FILE = flags.DEFINE_string(
    'key_file', None, f'The custodian key the run was written with (default: ${audit.KEY_FILE_ENV}, '
    'else ~/.config/tff_medical/audit.key).')
_EXPECTED_ROUNDS = flags.DEFINE_integer(
    'expected_rounds', None, 'The number of records there must be (e.g. from another copy of '
    'the ledger).', lower_bound=0)
_EXPECTED_HEAD = flags.DEFINE_string(
    'expected_head', None, 'A chain head that must be in the log, as JSON with round and mac '
    '(AuditLog.head(), e.g. from a checkpoint).')
flags.mark_flag_as_required('run_dir')

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  expected_head = None
  if _EXPECTED_HEAD.value is not None:
    try:
      expected_head = json.loads(_EXPECTED_HEAD.value)
    except ValueError:
      raise app.UsageError('--expected_head must be JSON like {"round": 3, "mac": "<64 hex>"}. '
                           f'Found {_EXPECTED_HEAD.value!r}.') from None
  try:
    result = audit.verify_run_dir(_RUN_DIR.value, expected_head=expected_head,
                                  expected_records=_EXPECTED_ROUNDS.value,
                                  key_file=_KEY_FILE.value)
  except TffMedicalError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for note in result.notes:
    print(f'not checked: {note}')
  if result.ok:
    print(f'audit log OK: {result.describe()}')
    return 0
  print(f'audit log {result.describe()}')
  return 1


if __name__ == '__main__':
  app.run(main)
