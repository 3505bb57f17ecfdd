"""Classifies image files with an exported model and shows each category's privacy level.

  python experiments/predict.py --model_dir=runs/exp1/saved_model scan1.png scan2.dcm

One line per file: `scan1.png  Chest CT  (privacy: Medium)  p=0.93`. PNG, JPEG and DICOM are
recognised by content. A file that cannot be read gets `path: cannot read image (reason)` on
stderr and the others go on; the exit status is then 1.

A model whose card says it was trained on synthetic data (the phantoms demo) first gets one
`warning: ...` line on stderr: its predictions on real images are meaningless.
"""

import os
import sys

# TensorFlow's C++ start-up notices would bury the one line per file; set before it is imported.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from tff_medical.errors import TffMedicalError
from tff_medical.export import predict
# pylint: enable=g-import-not-at-top,wrong-import-position

_MODEL_DIR = flags.DEFINE_string(
    'model_dir', None, 'A SavedModel folder written by tff_medical.export.export_saved_model.')
flags.mark_flag_as_required('model_dir')


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give at least one image file (PNG, JPEG or DICOM) after the flags.')
  try:
    failures = predict.predict_and_print(_MODEL_DIR.value, paths, sys.stdout, sys.stderr)
  except TffMedicalError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 1 if failures else 0


if __name__ == '__main__':
  app.run(main)
