"""Assembles the publishable bundle of a finished run into a new folder.

  .venv/bin/python experiments/release.py --run_dir=runs/demo --output=release/demo

The bundle holds what may leave the data custodian (tff_medical/run_files.py PUBLISHABLE):
saved_model/, model_card.json, privacy_ledger.json, metrics.csv without unpublishable columns, a
public dashboard (public_dashboard.html) and MANIFEST.json with each file's SHA-256. Confidential
files (audit log, partition manifest, checkpoints, config.json, the custodian's dashboard) are
refused. Prints the folder, its files and the metrics columns left out.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

_RUN_DIR = flags.DEFINE_string('run_dir', None, 'A finished run directory with an exported '
                               'model (experiments/export.py) and a privacy ledger.')
_OUTPUT = flags.DEFINE_string('output', None, 'The bundle folder to create: new or empty, '
                              'outside the run directory.')
_INCLUDE = flags.DEFINE_list('include', [], 'Publishable entries that must be in the bundle '
                             '(an error if the run lacks one); confidential or unknown names '
                             'are refused.')
flags.mark_flags_as_required(['run_dir', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # pylint: disable=g-import-not-at-top
  from tff_medical.errors import TffMedicalError
  from tff_medical.export import release
  # pylint: enable=g-import-not-at-top
  try:
    result = release.assemble(_RUN_DIR.value, _OUTPUT.value, include=_INCLUDE.value)
  except (TffMedicalError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'Wrote the publishable bundle {result.output}:')
  for path in result.files:
    print(f'  {path}')
  if result.dropped_columns:
    print('Left out of metrics.csv (not publishable): ' + ', '.join(result.dropped_columns))
  print(f'Scanned for {result.client_ids_checked} client ids and per-round timing: none found.')
  if result.exempt_site_ids:
    print(f'Example level: the ledger names its {result.exempt_site_ids} sites by design (the '
          'privacy unit is one image); their ids were not treated as leaks.')
  return 0


if __name__ == '__main__':
  app.run(main)
