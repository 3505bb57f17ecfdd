"""Centralized, non-private baseline on the embedded phantoms: how learnable the task is.

  .venv/bin/python experiments/baseline.py [--num_per_category=2000] [--epochs=5] \
      [--seed=0] [--batch_size=32] [--output_dir=runs/baseline]

Needs TensorFlow only: TensorFlow Federated is never imported.
"""

import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

# TensorFlow must be imported before app.run parses flags: imported inside main(), Keras
# layers return tensors without Keras history and Sequential models fail to build (TF 2.14).
from tff_medical.data import phantoms  # pylint: disable=g-import-not-at-top
from tff_medical.models import centralized  # pylint: disable=g-import-not-at-top

_NUM_PER_CATEGORY = flags.DEFINE_integer(
    'num_per_category', 2000, 'Training images per category.', lower_bound=1)
_TEST_PER_CATEGORY = flags.DEFINE_integer(
    'test_per_category', 500, 'Test images per category (a disjoint stream).', lower_bound=1)
_EPOCHS = flags.DEFINE_integer('epochs', 5, 'Training epochs.', lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Batch size.', lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 3e-3, 'Adam learning rate.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the phantoms and of training.', lower_bound=0)
_DIFFICULTY = flags.DEFINE_float(
    'difficulty', None, 'Phantom difficulty in [0, 1]; default: the generator\'s default.',
    lower_bound=0.0, upper_bound=1.0)
_CONV_FILTERS = flags.DEFINE_list(
    'conv_filters', ['16', '32'], 'Filters of each conv block (the build_cnn default).')
_INPUT_POOLING = flags.DEFINE_enum('input_pooling', '1', ['1', '2', '4', '8'],
                                   'Average-pool the input by this factor first.')
_HEAD = flags.DEFINE_enum('head', 'gap', ['gap', 'flatten'], 'Classifier head.')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'If set, results.json (metrics and these flags) is written there.')


def _model_kwargs() -> dict:
  try:
    filters = tuple(int(f) for f in _CONV_FILTERS.value)
  except ValueError:
    raise app.UsageError(f'--conv_filters must be integers. Found {_CONV_FILTERS.value}.')
  return {'conv_filters': filters, 'input_pooling': int(_INPUT_POOLING.value),
          'head': _HEAD.value}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  difficulty = (phantoms.DEFAULT_DIFFICULTY if _DIFFICULTY.value is None
                else _DIFFICULTY.value)
  start = time.perf_counter()
  result = centralized.phantom_baseline(
      _NUM_PER_CATEGORY.value, _TEST_PER_CATEGORY.value, epochs=_EPOCHS.value,
      batch_size=_BATCH_SIZE.value, learning_rate=_LEARNING_RATE.value, seed=_SEED.value,
      difficulty=difficulty, model_kwargs=_model_kwargs())
  wall_seconds = time.perf_counter() - start
  print(f'phantoms: difficulty {difficulty}, seed {_SEED.value}')
  print(result.summary())
  print(f'wall time (data + training + evaluation): {wall_seconds:.1f} s')
  if _OUTPUT_DIR.value:
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    path = os.path.join(_OUTPUT_DIR.value, 'results.json')
    hyperparameters = {
        name: flags.FLAGS[name].value
        for name in ('num_per_category', 'test_per_category', 'epochs', 'batch_size',
                     'learning_rate', 'seed')
    }
    hyperparameters['difficulty'] = difficulty
    hyperparameters['model'] = _model_kwargs()
    with open(path, 'w') as f:
      json.dump({'flags': hyperparameters, 'result': result.to_json_dict(),
                 'wall_seconds': wall_seconds}, f, indent=2)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
