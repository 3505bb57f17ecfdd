"""Cross-silo deployment with example-level DP-SGD at each site (privacy_unit 'example').

Run: see README, "Cross-silo deployment" (same commands, --config=configs/crosssilo_example.py).
Each site protects each of its images with per-category budgets (the seed policy: epsilon 0.5
to 2) by DP-SGD on its own data; the coordinator only averages the sites' updates, through
SecAgg+, and adds no noise. Budgets per site do not depend on the number of sites, so the seed
policy works with two sites (unlike client level, configs/crosssilo.py).
"""

import importlib.util
import os


def _crosssilo_config():
  """configs/crosssilo.py's settings (model, rounds, evaluation), loaded from beside this file."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'crosssilo.py')
  spec = importlib.util.spec_from_file_location('_crosssilo_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _crosssilo_config()
  config.policy = ''  # The seed policy, configs/privacy_policy.json.
  config.privacy_unit = 'example'
  config.example_dp.l2_norm_clip = 1.0
  config.example_dp.local_steps = 10  # DP-SGD steps per site and round.
  # Measured: round deltas of 11.6-12.0 at two phantom sites of 120 images (README command,
  # --config.total_rounds=2); the bound leaves room above that.
  config.example_dp.update_l2_bound = 30.0
  config.client.batch_size = 16  # Expected Poisson batch; each site needs at least this many.
  config.client.learning_rate = 0.5
  # Plain mean of the site updates (FedAvg, server step 1), as configs/example_level.py.
  config.server.optimizer = 'sgdm'
  config.server.learning_rate = 1.0
  config.server.momentum = 0.0
  return config
