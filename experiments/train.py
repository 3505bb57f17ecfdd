"""Trains a classifier with class-aware DP-FedAvg on a TFF simulation.

  .venv/bin/python experiments/train.py --config=configs/demo.py \
      [--config.total_rounds=3] [--root_output_dir=runs] [--experiment_name=demo]

Rerunning the same command resumes the run from its last completed round.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
# Imported before absl's main: Keras fails to build a Sequential model when TensorFlow is first
# imported inside it.
import tensorflow  # pylint: disable=unused-import
from ml_collections import config_flags

from tff_medical.training import flag_parsing  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/demo.py.', lock_config=True)
_ROOT_OUTPUT_DIR = flags.DEFINE_string('root_output_dir', 'runs', 'Where run directories go.')
_EXPERIMENT_NAME = flags.DEFINE_string(
    'experiment_name', None, 'Run directory name under --root_output_dir; default: the config '
    "file's name.")
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    # TFF's program state manager logs every save at INFO, drowning the progress bar.
    logging.set_verbosity(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from tff_medical import runtime
  from tff_medical.training import entry
  # pylint: enable=g-import-not-at-top
  name = _EXPERIMENT_NAME.value or os.path.splitext(
      os.path.basename(config_flags.get_config_filename(flags.FLAGS['config'])))[0]
  with entry.reported_errors():
    runtime.install_execution_context()
    print(entry.train_and_export(_CONFIG.value, os.path.join(_ROOT_OUTPUT_DIR.value, name)))


if __name__ == '__main__':
  # An unknown --config.<field> or a missing config file is a one-line usage error.
  app.run(main, flags_parser=flag_parsing.parse_flags_with_usage)
