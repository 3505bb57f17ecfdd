"""Times one training round of plain Keras, TFF FedAvg, TFF's DP round and ours; writes the doc.

  .venv/bin/python experiments/bench.py [--quick] [--output=docs/BENCHMARKS.md] \
      [--results_json=docs/benchmarks.json]

The CPU should be otherwise idle: the figures are ratios measured in one run, but a competing
job still skews them. The load average at start and end is written into the doc.
"""

import json
import os
import shlex
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
# Imported before absl's main: Keras fails to build a Sequential model when TensorFlow is first
# imported inside it.
import tensorflow  # pylint: disable=unused-import

_QUICK = flags.DEFINE_bool(
    'quick', False, 'Fewer timed rounds (2 instead of 5): a smoke run, noisier figures.')
_OUTPUT = flags.DEFINE_string('output', 'docs/BENCHMARKS.md', 'Markdown report to (re)write.')
_RESULTS_JSON = flags.DEFINE_string(
    'results_json', 'docs/benchmarks.json', 'All figures, with the flags, as JSON.')

_TIMED_ROUNDS = 5
_QUICK_TIMED_ROUNDS = 2


def _command() -> str:
  python = sys.executable
  relative = os.path.relpath(python)
  if not relative.startswith('..'):
    python = relative
  return shlex.join([python, 'experiments/bench.py'] + sys.argv[1:])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # pylint: disable=g-import-not-at-top
  from tff_medical import runtime
  from tff_medical.benchmarks import report
  from tff_medical.benchmarks import round_time
  # pylint: enable=g-import-not-at-top
  timed_rounds = _QUICK_TIMED_ROUNDS if _QUICK.value else _TIMED_ROUNDS
  # TFF logs each aggregator it builds at INFO; the progress lines below are what matter here.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    runtime.install_execution_context()
    results = round_time.run_benchmark(round_time.DEFAULT_SETTINGS, timed_rounds=timed_rounds,
                                       log=lambda message: print(message, flush=True))
  finally:
    runtime.shutdown()
  command = _command()
  results['command'] = command
  results['flags'] = {'quick': _QUICK.value, 'output': _OUTPUT.value,
                      'results_json': _RESULTS_JSON.value, 'timed_rounds': timed_rounds}
  for path in (_OUTPUT.value, _RESULTS_JSON.value):
    if os.path.dirname(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(_RESULTS_JSON.value, 'w') as f:
    json.dump(results, f, indent=2)
    f.write('\n')
  with open(_OUTPUT.value, 'w') as f:
    f.write(report.render_markdown(results, command))
  for result in results['settings']:
    for key, target in result['targets'].items():
      print(f'{result["setting"]["name"]}: {key} = {target["ratio"]:.2f} '
            f'(target {target["target"]}: {"met" if target["met"] else "not met"})')
  print(f'wrote {_OUTPUT.value} and {_RESULTS_JSON.value}')


if __name__ == '__main__':
  app.run(main)
