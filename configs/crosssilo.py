"""Cross-silo deployment: a few sites, every site every round (rate 1), small model.

Run: see README, "Cross-silo deployment". Sites and addresses are flags of
experiments/coordinator.py; this file holds the training settings.

With rate 1 and a handful of sites there is no sampling amplification and the DP mean divides
the noise by only N sites: budgets like the seed policy's cost far more noise than in the
simulation (README: "What client-level budgets cost with few sites").
"""

import os

from tff_medical.training import config as config_lib


def get_config():
  config = config_lib.base_config()
  # Demonstration budgets (epsilon 100): the seed policy is refused with 2-3 sites. Point
  # --config.policy at your own policy for real use, with enough sites (see the README table).
  config.policy = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'privacy_policy_crosssilo_demo.json')
  config.total_rounds = 20
  config.model.conv_filters = (8, 16)
  config.client.learning_rate = 0.1
  config.client.local_epochs = 1
  config.server.optimizer = 'sgdm'
  config.server.learning_rate = 0.5
  config.server.momentum = 0.9
  # With few sites the clipped count's noise (stddev >= ~3.3 z) is large against N: allow it.
  config.clip.max_count_noise_fraction = 1.0
  config.eval_every = 1
  return config
