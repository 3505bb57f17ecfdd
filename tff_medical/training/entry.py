"""What `experiments/train.py` does once flags are parsed: train, export, summarize."""

import os

from absl import logging

from tff_medical.monitoring import dashboard
from tff_medical.training import program
from tff_medical.training import report


def train_and_export(config, run_dir: str, progress: bool = True) -> str:
  """Trains or resumes the run in `run_dir`, exports the model, returns the summary table.

  run_dir/dashboard.html is rebuilt after every round (the page reloads itself while the run is
  live) and a last time at the end, which turns the reloading off.
  """
  page = os.path.join(run_dir, dashboard.DASHBOARD_FILENAME)

  def refresh(live: bool) -> None:
    try:
      dashboard.build_dashboard([run_dir], page, live=live)
    except (OSError, dashboard.DashboardError) as e:  # A view must not stop training.
      logging.warning('Dashboard not updated: %s', e)

  try:
    result = program.run(config, run_dir, progress=progress, on_round=lambda _: refresh(True))
    if config.export:
      result.saved_model_dir = program.export(result)
  finally:
    if os.path.isdir(run_dir):
      refresh(False)
  return report.summary_table(result, dashboard_path=page)
