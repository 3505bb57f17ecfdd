"""How much of a cross-silo round one malicious site controls (README, cross-silo "Faults").

  .venv/bin/python experiments/crosssilo_influence.py [--sites=2,5,10] [--num_weights=1350]

Runs the real site encoder and coordinator decoder (tff_medical.crosssilo.mechanism) on
synthetic clipped updates; see tff_medical.crosssilo.influence for what each column means.
"""

from absl import app
from absl import flags

_SITES = flags.DEFINE_list('sites', ['2', '5', '10'], 'Sites in the round (each at least 2).')
_NUM_WEIGHTS = flags.DEFINE_integer('num_weights', 1350,
                                    'Model size (configs/crosssilo.py: 1,350).')
_TRIALS = flags.DEFINE_integer('trials', 20, 'Random draws averaged per row.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    sites = [int(s) for s in _SITES.value]
  except ValueError:
    raise app.UsageError(f'--sites must be integers. Found {_SITES.value}.') from None
  if any(n < 2 for n in sites) or _NUM_WEIGHTS.value < 1 or _TRIALS.value < 1:
    raise app.UsageError('--sites must be at least 2 each, --num_weights and --trials '
                         'positive.')
  from tff_medical.crosssilo import influence  # pylint: disable=g-import-not-at-top
  print(influence.table(sites, _NUM_WEIGHTS.value, _TRIALS.value))


if __name__ == '__main__':
  app.run(main)
