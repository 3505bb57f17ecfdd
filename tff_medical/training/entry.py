"""What the training and coordinator scripts share once flags are parsed: run, export, report."""

import contextlib
import os
import sys
import time
from typing import Callable, Optional

from absl import app
from absl import logging

from tff_medical import runtime
from tff_medical.errors import ConfigError
from tff_medical.errors import TffMedicalError
from tff_medical.monitoring import dashboard
from tff_medical.training import program
from tff_medical.training import report
from tff_medical.training import run_record

OnRound = Callable[[dict], None]


@contextlib.contextmanager
def reported_errors():
  """A user's mistake is one line, never a traceback; Ctrl-C says how to resume; the TFF
  worker never outlives the script."""
  try:
    yield
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  except TffMedicalError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    # Every completed round is checkpointed; nothing of the interrupted one was released.
    print('\ninterrupted; rerun the same command to resume from the last completed round.',
          file=sys.stderr)
    sys.exit(130)
  finally:
    runtime.shutdown()


def train_and_export(config, run_dir: str, progress: bool = True,
                     train: Optional[Callable[[OnRound], run_record.RunResult]] = None) -> str:
  """Trains or resumes the run in `run_dir`, exports the model, returns the summary table.

  `train(on_round)` runs the rounds: by default the simulation (program.run); the coordinator
  script passes the cross-silo run. run_dir/dashboard.html is rebuilt after rounds (LivePage;
  the page reloads itself while the run is live) and a last time at the end, which turns the
  reloading off.
  """
  page = LivePage(run_dir)
  if train is None:
    train = lambda on_round: program.run(config, run_dir, progress=progress, on_round=on_round)
  try:
    result = train(lambda _: page.refresh(live=True))
    if config.export and result.rounds_completed:
      result.saved_model_dir = program.export(result)
  finally:
    if os.path.isdir(run_dir):
      page.refresh(live=False)
  return report.summary_table(result, dashboard_path=page.path)


class LivePage:
  """run_dir/dashboard.html, rebuilt after rounds but never for more than `share` of the time.

  A rebuild reads every round's records, so it grows with the run: a round is skipped when the
  last rebuild ended less than (its duration / share) ago. The final rebuild always happens.
  """

  def __init__(self, run_dir: str, share: float = 0.05,
               clock: Callable[[], float] = time.monotonic):
    self.run_dir = run_dir
    self.path = os.path.join(run_dir, dashboard.DASHBOARD_FILENAME)
    self._share, self._clock = share, clock
    self._last_end, self._last_took = None, 0.0

  def refresh(self, live: bool) -> None:
    started = self._clock()
    if live and self._last_end is not None and (
        started - self._last_end < self._last_took / self._share):
      return
    try:
      dashboard.build_dashboard([self.run_dir], self.path, live=live)
    except (OSError, dashboard.DashboardError) as e:  # A view must not stop training.
      logging.warning('Dashboard not updated: %s', e)
    self._last_end = self._clock()
    self._last_took = self._last_end - started
