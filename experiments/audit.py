"""Runs the training program in audit mode and reports claimed against empirical epsilon.

  .venv/bin/python experiments/audit.py --config=configs/demo.py \
      [--config.audit.canaries_per_category=2000] [--root_output_dir=runs] \
      [--experiment_name=demo_audit] [--doc=docs/PRIVACY_AUDIT.md]

Canary clients are inserted per category (tff_medical/training/canaries.py); the run directory
gets empirical_audit.json and a model card marked as an audit run (no SavedModel: an audit
model carries its canaries). With --doc, the page is rewritten with the machine, the date and
this command. Exit status 1 if any category's empirical epsilon exceeds its claim.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import tensorflow  # pylint: disable=unused-import
from ml_collections import config_flags

from tff_medical.training import flag_parsing  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/demo.py.', lock_config=True)
_ROOT_OUTPUT_DIR = flags.DEFINE_string('root_output_dir', 'runs', 'Where run directories go.')
_EXPERIMENT_NAME = flags.DEFINE_string(
    'experiment_name', None, "Run directory name; default: the config file's name + '_audit'.")
_DOC = flags.DEFINE_string('doc', None, 'Rewrite this Markdown page with the results.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from tff_medical import runtime
  from tff_medical.errors import ConfigError
  from tff_medical.errors import TffMedicalError
  from tff_medical.training import audit_page
  # pylint: enable=g-import-not-at-top
  name = _EXPERIMENT_NAME.value or os.path.splitext(os.path.basename(
      config_flags.get_config_filename(flags.FLAGS['config'])))[0] + '_audit'
  config = _CONFIG.value
  config.audit.enabled = True
  try:
    runtime.install_execution_context()
    report, page = audit_page.run_audit(config, os.path.join(_ROOT_OUTPUT_DIR.value, name),
                                        command=' '.join(['python'] + sys.argv))
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  except TffMedicalError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  finally:
    runtime.shutdown()
  print(page)
  if _DOC.value:
    audit_page.write_page(_DOC.value, page)
  sys.exit(0 if report['passed'] else 1)


if __name__ == '__main__':
  app.run(main, flags_parser=flag_parsing.parse_flags_with_usage)
