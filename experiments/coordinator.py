"""Runs the cross-silo coordinator: SuperLink (mTLS, node auth), SecAgg+ rounds, DP, run dir.

  .venv/bin/python experiments/coordinator.py --config=configs/crosssilo.py \
      --pki_dir=pki --num_sites=2 [--threshold=2] [--host=127.0.0.1] [--fleet_port=9092] \
      [--root_output_dir=runs] [--experiment_name=crosssilo]

Sites connect to --host:--fleet_port (127.0.0.1: this machine only; use the coordinator's
address, listed in its certificate, for sites on other machines). Rerunning the same command
resumes the run from its last completed round.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['FLWR_TELEMETRY_ENABLED'] = '0'

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import tensorflow  # pylint: disable=unused-import,g-import-not-at-top
from ml_collections import config_flags

from tff_medical.data import sources  # pylint: disable=g-import-not-at-top
from tff_medical.training import flag_parsing  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/crosssilo.py.', lock_config=True)
_PKI_DIR = flags.DEFINE_string('pki_dir', None, 'Provisioning folder (experiments/provision.py).')
_NUM_SITES = flags.DEFINE_integer('num_sites', None, 'Enrolled sites taking part (N).')
_THRESHOLD = flags.DEFINE_integer('threshold', 2,
                                  'SecAgg+ threshold: fewest sites to finish a round.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address the Fleet API listens on.')
_FLEET_PORT = flags.DEFINE_integer('fleet_port', 9092, 'Fleet API port (sites connect here).')
_DRIVER_PORT = flags.DEFINE_integer('driver_port', 9091, 'Driver API port (127.0.0.1 only).')
_STAGE_TIMEOUT = flags.DEFINE_float('stage_timeout', 60.0, 'Seconds per key-exchange stage.')
_TRAIN_TIMEOUT = flags.DEFINE_float('train_timeout', 600.0, 'Seconds for local training.')
_JOIN_TIMEOUT = flags.DEFINE_float('join_timeout', 600.0, 'Seconds to wait for sites.')
_MAX_ABANDONED = flags.DEFINE_integer('max_abandoned_rounds', 3,
                                      'Stop after this many abandoned rounds in a row.')
_EVAL_DATASET = flags.DEFINE_enum('eval_dataset', 'none',
                                  ['none', *sources.NAMES],
                                  "The coordinator's own evaluation data (never site data).")
_EVAL_DATA_DIR = flags.DEFINE_string('eval_data_dir', '', 'Folder of --eval_dataset.')
_EVAL_NUM = flags.DEFINE_integer('eval_num_per_category', 50, 'phantoms evaluation size.')
_ROOT_OUTPUT_DIR = flags.DEFINE_string('root_output_dir', 'runs', 'Where run directories go.')
_EXPERIMENT_NAME = flags.DEFINE_string('experiment_name', 'crosssilo', 'Run directory name.')
flags.mark_flags_as_required(['config', 'pki_dir', 'num_sites'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from tff_medical.crosssilo import coordinator
  from tff_medical.training import entry
  # pylint: enable=g-import-not-at-top
  run_dir = os.path.join(_ROOT_OUTPUT_DIR.value, _EXPERIMENT_NAME.value)
  with entry.reported_errors():
    deployment = coordinator.Deployment(
        pki_dir=_PKI_DIR.value, num_sites=_NUM_SITES.value, threshold=_THRESHOLD.value,
        host=_HOST.value, fleet_port=_FLEET_PORT.value, driver_port=_DRIVER_PORT.value,
        stage_timeout=_STAGE_TIMEOUT.value, train_timeout=_TRAIN_TIMEOUT.value,
        join_timeout=_JOIN_TIMEOUT.value, max_abandoned_rounds=_MAX_ABANDONED.value,
        eval_dataset=_EVAL_DATASET.value, eval_data_dir=_EVAL_DATA_DIR.value,
        eval_num_per_category=_EVAL_NUM.value)

    def cross_silo(on_round):
      def each_round(record):
        print(f'round {record["round"]}: {record["metrics"]["num_clients"]} sites', flush=True)
        on_round(record)
      return coordinator.run(_CONFIG.value, deployment, run_dir, on_round=each_round)

    print(entry.train_and_export(_CONFIG.value, run_dir, train=cross_silo))


if __name__ == '__main__':
  app.run(main, flags_parser=flag_parsing.parse_flags_with_usage)
