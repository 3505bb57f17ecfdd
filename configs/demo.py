"""Demo: the embedded phantom data, DP with the seed policy, sized for 2 CPU cores (~10 min).

Run: make demo   (or: .venv/bin/python experiments/train.py --config=configs/demo.py)
"""

from tff_medical.training import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'phantoms'
  config.num_per_category = 700
  config.num_clients = 1000
  config.clients_per_round = 100
  config.total_rounds = 60
  config.partition = 'iid'
  config.eval_every = 10
  # The per-category clipped count needs noise >= 3.28 z (value noise within 5% of z); with 100
  # clients a round that is about 0.2 of them.
  config.clip.max_count_noise_fraction = 0.25
  return config
