"""What `experiments/train.py` does once flags are parsed: train, export, summarize."""

import os

from tff_medical.training import program
from tff_medical.training import report


def train_and_export(config, run_dir: str, progress: bool = True) -> str:
  """Trains or resumes the run in `run_dir`, exports the model, returns the summary table."""
  result = program.run(config, run_dir, progress=progress)
  if config.export:
    result.saved_model_dir = program.export(result)
  return report.summary_table(result)
