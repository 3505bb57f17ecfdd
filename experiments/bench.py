"""Times a round of plain Keras, TFF FedAvg, TFF's DP round and ours, and how ours scales.

  .venv/bin/python experiments/bench.py [--mode=quick|full] [--output=docs/BENCHMARKS.md] \
      [--results_json=docs/benchmarks.json] [--plot=docs/benchmarks_scaling.svg] \
      [--scaling_config=configs/demo.py]

--mode=quick (the default, `make bench`): the round comparison with 2 timed rounds and a reduced
scaling curve, a few minutes on 2 cores. --mode=full (`make bench-full`): 5 timed rounds and the
full curve (up to 1000 clients a round and 59,000 one-image clients), about a quarter of an hour.

The CPU should be otherwise idle: the figures are ratios measured in one run, but a competing
job still skews them. The load average at start and end is written into the doc.
"""

import json
import os
import shlex
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
# Imported before absl's main: Keras fails to build a Sequential model when TensorFlow is first
# imported inside it.
import tensorflow  # pylint: disable=unused-import
from ml_collections import config_flags

from tff_medical.training import flag_parsing  # pylint: disable=g-import-not-at-top

_MODE = flags.DEFINE_enum(
    'mode', 'quick', ['quick', 'full'],
    'quick: CI-sized (2 timed rounds, a reduced scaling curve, a 4-run privacy-utility check); '
    'full: the study (5 timed rounds, the scaling curve up to 59,000 clients and 1000 clients '
    'a round, the privacy-utility grid at MedNIST size).')
_OUTPUT = flags.DEFINE_string('output', 'docs/BENCHMARKS.md', 'Markdown report to (re)write.')
_RESULTS_JSON = flags.DEFINE_string(
    'results_json', 'docs/benchmarks.json', 'All figures, with the flags, as JSON.')
_PLOT = flags.DEFINE_string('plot', 'docs/benchmarks_scaling.svg',
                            'SVG of the scaling curves, linked from --output.')
_STUDY_PLOT = flags.DEFINE_string('study_plot', 'docs/benchmarks_privacy_utility.svg',
                                  'Where the privacy-utility plot is written.')
_EXAMPLE_LEVEL_JSON = flags.DEFINE_string(
    'example_level_json', 'docs/example_level.json',
    'Figures of experiments/example_level_bench.py shown on the page (not rerun here); '
    'empty or missing: left out.')
_SCALING_CONFIG = config_flags.DEFINE_config_file(
    'scaling_config', 'configs/demo.py', 'Training config whose round the scaling curve times.')


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
  from tff_medical.benchmarks import modes
  from tff_medical.benchmarks import overhead
  from tff_medical.benchmarks import plot
  from tff_medical.benchmarks import privacy_utility
  from tff_medical.benchmarks import report
  from tff_medical.benchmarks import round_time
  from tff_medical.benchmarks import scaling
  # pylint: enable=g-import-not-at-top
  spec = modes.MODES[modes.Mode(_MODE.value)]
  log = lambda message: print(message, flush=True)
  # TFF logs each aggregator it builds at INFO; the progress lines below are what matter here.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  started = time.perf_counter()
  try:
    runtime.install_execution_context()
    results = round_time.run_benchmark(round_time.DEFAULT_SETTINGS,
                                       timed_rounds=spec.comparison_timed_rounds, log=log)
  finally:
    # Each scaling point starts its own worker; this one would only hold memory meanwhile.
    runtime.shutdown()
  results['scaling'] = scaling.run_scaling(spec.scaling_plan, _SCALING_CONFIG.value, log=log)
  results['privacy_utility'] = privacy_utility.run_study(spec.study_plan, log=log)
  runtime.install_execution_context()
  try:
    results['overhead'] = overhead.run_overhead(_SCALING_CONFIG.value, spec.overhead_rounds,
                                                log=log)
  finally:
    runtime.shutdown()
  results['load_average_end'] = round_time.load_average()
  results['wall_seconds'] = time.perf_counter() - started
  results['date_utc'] = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
  command = _command()
  results['command'] = command
  results['flags'] = {'mode': _MODE.value, 'output': _OUTPUT.value,
                      'results_json': _RESULTS_JSON.value, 'plot': _PLOT.value,
                      'study_plot': _STUDY_PLOT.value,
                      'scaling_config': config_flags.get_config_filename(
                          flags.FLAGS['scaling_config']),
                      'timed_rounds': spec.comparison_timed_rounds}
  for path in (_OUTPUT.value, _RESULTS_JSON.value, _PLOT.value, _STUDY_PLOT.value):
    if os.path.dirname(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(_RESULTS_JSON.value, 'w') as f:
    json.dump(results, f, indent=2)
    f.write('\n')
  with open(_PLOT.value, 'w') as f:
    f.write(plot.scaling_svg(results['scaling']))
  with open(_STUDY_PLOT.value, 'w') as f:
    f.write(plot.privacy_utility_svg(results['privacy_utility']))
  page_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
  plot_link = os.path.relpath(_PLOT.value, page_dir)
  study_plot_link = os.path.relpath(_STUDY_PLOT.value, page_dir)
  example_level = None
  if _EXAMPLE_LEVEL_JSON.value and os.path.exists(_EXAMPLE_LEVEL_JSON.value):
    with open(_EXAMPLE_LEVEL_JSON.value) as f:
      example_level = json.load(f)
  with open(_OUTPUT.value, 'w') as f:
    f.write(report.render_markdown(results, command, plot_link, example_level,
                                   study_plot_link))
  for result in results['settings']:
    for key, target in result['targets'].items():
      print(f'{result["setting"]["name"]}: {key} = {target["ratio"]:.2f} '
            f'(target {target["target"]}: {"met" if target["met"] else "not met"})')
  print(f'wrote {_OUTPUT.value}, {_RESULTS_JSON.value}, {_PLOT.value} and {_STUDY_PLOT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=flag_parsing.parse_flags_with_usage)
