"""The short table a run ends with: accuracy and privacy spent per category, and where things are."""

import os

from tff_medical import categories


def summary_table(result, dashboard_path=None) -> str:
  evaluation = result.evaluation
  lines = [
      f'Run finished: {result.rounds_completed} rounds ({result.stop_reason.replace("_", " ")}).',
      '',
      f'{"Category":<14}{"Privacy":<9}{"Accuracy":>9}{"Epsilon spent":>15}{"Budget":>8}'
      f'{"Status":>11}',
  ]
  for c in categories.CATEGORY_IDS:
    budget = result.policy.budget(c)
    accuracy = evaluation[f'accuracy/{c}']
    if result.ledger is not None:
      spent = f'{result.ledger.epsilon_spent(c):.3f}'
      status = result.ledger.status(c).value
    else:
      spent, status = 'no DP', '-'
    lines.append(f'{budget.display_name:<14}{budget.privacy_level.value:<9}{accuracy:>9.1%}'
                 f'{spent:>15}{budget.epsilon:>8.2f}{status:>11}')
  overall = ''
  if result.ledger is not None:
    # An example-level run without stacked client-level noise has no client-level figure.
    example_only = getattr(result.ledger, 'example', None) is not None and (
        result.ledger.client is None)
    where = 'example level, worst site' if example_only else 'client level'
    overall = (f'{result.ledger.client_level_epsilon:>15.3f}  ({where}, '
               f'delta {result.policy.delta:g})')
  lines.append(f'{"All":<23}{evaluation["accuracy"]:>9.1%}' + overall)
  lines += ['', f'Run directory: {os.path.abspath(result.run_dir)}']
  if dashboard_path:
    lines.append(f'Dashboard:     {os.path.abspath(dashboard_path)}')
  if result.saved_model_dir:
    lines.append(f'Model:         {os.path.abspath(result.saved_model_dir)}')
  return '\n'.join(lines)
