"""The program's per-round overhead at the demo's shape: commit steps against the round itself."""

import statistics
import tempfile
import time
from typing import Callable, Optional

from tff_medical.training import entry
from tff_medical.training import program

STEPS = ('checkpoint', 'spend', 'publish', 'on_round')
STEP_NAMES = {
    'checkpoint': 'checkpoint (model, aggregator, sampler, ledger state)',
    'spend': 'spend (budget registry, keyed audit record)',
    'publish': 'publish (ledger, metrics.csv, TensorBoard)',
    'on_round': 'live dashboard (rebuilt at most 5% of the time)',
}


def run_overhead(config, rounds: int, log: Callable[[str], None] = print,
                 warmup_rounds: int = 2) -> dict:
  """Runs `config` for warmup + `rounds` rounds as `make demo` does (live dashboard).

  Returns the median round time (training, aggregation, ledger) and each commit step's mean
  seconds a round over the timed rounds; the warm-up rounds (tracing, first RDP curves) are run
  in a first invocation and not counted.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.total_rounds = warmup_rounds + rounds
    config.eval_every = config.total_rounds  # Evaluation is not per-round work.
  round_seconds = []
  with tempfile.TemporaryDirectory() as root:
    run_dir = f'{root}/run'
    page = entry.LivePage(run_dir)

    def on_round(record: dict) -> None:
      if record['round'] > warmup_rounds:  # Not the warm-up's last round, released again.
        round_seconds.append(record['audit']['round_seconds'])
      page.refresh(live=True)

    # The caller installs TFF's execution context (bench.py; the tests' session context).
    program.run(config, run_dir, on_round=on_round, stop_after_rounds=warmup_rounds)
    started = time.perf_counter()
    result = program.run(config, run_dir, on_round=on_round)
    wall = time.perf_counter() - started
  round_median = statistics.median(round_seconds)
  steps = {step: result.commit_seconds.get(step, 0.0) / rounds for step in STEPS}
  overhead = sum(steps.values())
  log(f'overhead: round {round_median:.3f} s, commit {overhead:.3f} s a round '
      f'({overhead / round_median:.0%})')
  return {'clients_per_round': int(config.clients_per_round), 'rounds': rounds,
          'round_seconds_median': round_median, 'round_seconds': round_seconds,
          'step_seconds': steps, 'overhead_seconds': overhead,
          'overhead_fraction': overhead / round_median, 'wall_seconds': wall}


def render(figures: Optional[dict], config_name: str) -> list[str]:
  """The page's section: the split a round, and the target."""
  if not figures:
    return []
  lines = [
      '## Per-round overhead of the program', '',
      f'`{config_name}` as `make demo` runs it (with its live dashboard), '
      f'{figures["clients_per_round"]} clients a round, {figures["rounds"]} timed rounds after '
      'two warm-up rounds; evaluation left out (it runs every 10th round, not every round). '
      'The round is training, aggregation and the ledger\'s accounting; the rest is what the '
      'program does to commit it (training/run_record.py: checkpoint first, then the spend, '
      'then what is published).', '',
      '| step | seconds a round | share of the round |', '|---|---:|---:|',
      f'| round (median) | {figures["round_seconds_median"]:.3f} | 100% |',
  ]
  for step in STEPS:
    seconds = figures['step_seconds'][step]
    lines.append(f'| {STEP_NAMES[step]} | {seconds:.3f} | '
                 f'{seconds / figures["round_seconds_median"]:.1%} |')
  met = figures['overhead_fraction'] <= 0.10
  lines += [
      f'| **overhead in all** | **{figures["overhead_seconds"]:.3f}** | '
      f'**{figures["overhead_fraction"]:.1%}** |', '',
      f'Target: at most 10% of the round: {"met" if met else "not met"}.', '',
  ]
  return lines
