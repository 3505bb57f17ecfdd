"""Tuning with the fast surrogate of class-aware DP-FedAvg, scored on a validation draw only.

The surrogate (tff_medical.benchmarks.surrogate) runs the class-aware mechanism without TFF's
per-round overhead; here with one image a client, so a 100-round setting is scored in a minute.
Scores are on a fresh phantom draw (seed 1000 + seed), never on the test split a run reports;
the chosen setting is then confirmed by the real program (README, docs/TUNING.md).

  .venv/bin/python experiments/tune_surrogate.py --model=pool4_flatten --conv_filters=8 \\
      --server=adam --server_lr=0.02 --clients_per_round=200 --rounds=100
"""

import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags  # pylint: disable=g-import-not-at-top

from tff_medical import runtime  # pylint: disable=g-import-not-at-top
from tff_medical.benchmarks import surrogate  # pylint: disable=g-import-not-at-top
from tff_medical.data import phantoms  # pylint: disable=g-import-not-at-top

_NUM_PER_CATEGORY = flags.DEFINE_integer('num_per_category', 1500, 'Phantoms per category; '
                                         '10% are held out as the run\'s test split.')
_CLIENTS_PER_ROUND = flags.DEFINE_float('clients_per_round', 200, 'Expected clients a round.')
_ROUNDS = flags.DEFINE_integer('rounds', 100, 'Rounds (the calibration horizon).')
_MODEL = flags.DEFINE_enum('model', 'pool4_flatten',
                           ['gap', 'pool4_gap', 'pool2_flatten', 'pool4_flatten'], 'Model shape.')
_CONV_FILTERS = flags.DEFINE_list('conv_filters', ['8'], 'Filters of each conv block.')
_CLIENT_LR = flags.DEFINE_float('client_lr', 0.2, 'Client learning rate (one step).')
_SERVER = flags.DEFINE_enum('server', 'adam', ['adam', 'sgdm'], 'Server optimizer.')
_SERVER_LR = flags.DEFINE_float('server_lr', 0.02, 'Server learning rate.')
_MOMENTUM = flags.DEFINE_float('momentum', 0.9, 'Server momentum (sgdm).')
_TARGET = flags.DEFINE_float('target_unclipped_quantile', None,
                             'Default: 5/6 + 1/12 (five in six clients send zeros).')
_INITIAL_CLIP = flags.DEFINE_float('initial_clip', 0.1, 'Initial clip norm.')
_CLIP_LR = flags.DEFINE_float('clip_learning_rate', 0.2, 'Adaptive clip learning rate.')
_DP = flags.DEFINE_bool('dp', True, 'Noise and clipping on.')
_POLICY_SCALE = flags.DEFINE_float('policy_scale', 1.0, 'Every epsilon times this.')
_SEED = flags.DEFINE_integer('seed', 0, 'Data, model and noise seed.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 25, 'Rounds between validation scores.')

_MODELS = {'gap': (1, 'gap'), 'pool4_gap': (4, 'gap'), 'pool2_flatten': (2, 'flatten'),
           'pool4_flatten': (4, 'flatten')}


def _settings() -> surrogate.Settings:
  pooling, head = _MODELS[_MODEL.value]
  return surrogate.Settings(
      clients_per_round=_CLIENTS_PER_ROUND.value, rounds=_ROUNDS.value,
      conv_filters=tuple(int(f) for f in _CONV_FILTERS.value), input_pooling=pooling,
      head=head, client_lr=_CLIENT_LR.value, server=_SERVER.value, server_lr=_SERVER_LR.value,
      momentum=_MOMENTUM.value,
      target_unclipped_quantile=(_TARGET.value if _TARGET.value is not None else
                                 surrogate.target_for_clients(1)),
      initial_clip=_INITIAL_CLIP.value, clip_learning_rate=_CLIP_LR.value, dp=_DP.value,
      policy_scale=_POLICY_SCALE.value)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    settings = _settings()
  except ValueError as e:  # A bad flag value: say which, without a traceback.
    raise app.UsageError(str(e)) from None
  seed = _SEED.value
  x_all, y_all = surrogate.as_inputs(phantoms.generate(_NUM_PER_CATEGORY.value, seed=seed))
  held_out = len(y_all) // 10  # The run's test split: never trained on, never scored here.
  x, y = x_all[held_out:], y_all[held_out:]
  x_val, y_val = surrogate.as_inputs(phantoms.generate(max(100, _NUM_PER_CATEGORY.value // 10),
                                                       seed=1000 + seed))
  start = time.perf_counter()
  result = surrogate.train(
      x, y, *surrogate.one_image_clients(len(y)), x_val, y_val, settings, seed,
      eval_every=_EVAL_EVERY.value,
      log=lambda line: print(f'validation {line} ({time.perf_counter() - start:.0f} s)',
                             flush=True))
  print(json.dumps({'flags': {name: flags.FLAGS[name].value for name in (
      'num_per_category', 'clients_per_round', 'rounds', 'model', 'conv_filters', 'client_lr',
      'server', 'server_lr', 'dp', 'policy_scale', 'seed')},
                    'parameters': result['parameters'],
                    'validation_accuracy': result['accuracy'],
                    'validation_per_category': result['per_category'],
                    'history': result['history']}))


def main(argv):
  try:
    _main(argv)
  finally:
    runtime.shutdown()  # No TFF computation runs here, but TFF's import set a default context.


if __name__ == '__main__':
  app.run(main)
