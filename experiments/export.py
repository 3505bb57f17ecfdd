"""Exports a run's latest checkpoint as a SavedModel (run_dir/saved_model) and a model card.

  .venv/bin/python experiments/export.py --run_dir=runs/demo
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
# Imported before absl's main: Keras fails to build a Sequential model when TensorFlow is first
# imported inside it.
import tensorflow  # pylint: disable=unused-import

_RUN_DIR = flags.DEFINE_string('run_dir', None, 'A run directory written by train.py.')
flags.mark_flags_as_required(['run_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    # TFF's program state manager logs every save at INFO, drowning the progress bar.
    logging.set_verbosity(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from tff_medical import runtime
  from tff_medical.errors import TffMedicalError
  from tff_medical.training import program
  # pylint: enable=g-import-not-at-top
  try:
    runtime.install_execution_context()
    config = program.config_of_run(_RUN_DIR.value)
    result = program.run(config, _RUN_DIR.value, stop_after_rounds=0)
    print(f'Exported round {result.rounds_completed} to {program.export(result)}')
  except TffMedicalError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  finally:
    runtime.shutdown()


if __name__ == '__main__':
  app.run(main)
