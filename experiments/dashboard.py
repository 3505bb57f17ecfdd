"""Writes the HTML dashboard of one or more finished (or running) training runs.

  python experiments/dashboard.py --run_dirs=runs/demo [--output=runs/demo/dashboard.html]
  python experiments/dashboard.py --run_dirs=runs/a,runs/b --output=compare.html

One self-contained file (charts, data and chart library inline) that opens from file:// with no
network. Several run dirs are overlaid side by side, one colour per run. Prints the path written.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

_RUN_DIRS = flags.DEFINE_list('run_dirs', None, 'Comma-separated run directories to show.')
_OUTPUT = flags.DEFINE_string(
    'output', None, 'The HTML file to write; default: <run_dir>/dashboard.html for one run, '
    './dashboard.html for several.')
flags.mark_flag_as_required('run_dirs')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # pylint: disable=g-import-not-at-top
  from tff_medical.errors import TffMedicalError
  from tff_medical.monitoring import dashboard
  # pylint: enable=g-import-not-at-top
  run_dirs = [d for d in _RUN_DIRS.value if d]
  if not run_dirs:
    raise app.UsageError('--run_dirs must name at least one run directory.')
  output = _OUTPUT.value
  if not output:
    output = (os.path.join(run_dirs[0], dashboard.DASHBOARD_FILENAME) if len(run_dirs) == 1
              else dashboard.DASHBOARD_FILENAME)
  try:
    print(dashboard.build_dashboard(run_dirs, output, live=False))
  except TffMedicalError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  app.run(main)
