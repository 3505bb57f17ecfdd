"""Example-level DP-SGD at a few sites (cross-silo): 5 sites sharing MedNIST-sized data.

Each site protects each patient's image with DP-SGD and per-category budgets (privacy_unit
'example', tff_medical.training.dp_sgd); the server averages the five site updates. With
--config.dataset=mednist --config.data_dir=/path the real MedNIST is used; otherwise phantoms
of the same size (10,000 a category). Train:
  .venv/bin/python experiments/train.py --config=configs/example_level.py
Benchmark against client-level DP and non-private training on the same sites:
  nice -n 10 .venv/bin/python experiments/example_level_bench.py
"""

from tff_medical.training import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'phantoms'
  config.num_per_category = 10000
  config.num_clients = 5  # Sites.
  config.clients_per_round = 5  # Every site takes part in every round.
  config.total_rounds = 30
  config.partition = 'iid'
  config.eval_every = 10
  config.privacy_unit = 'example'
  config.example_dp.l2_norm_clip = 1.0
  config.example_dp.local_steps = 20
  config.client.batch_size = 64  # Expected Poisson batch: q = 64 / ~9,600 a site.
  config.client.learning_rate = 0.5
  # Plain averaging of the site updates (FedAvg, server step 1): momentum over multi-step
  # site updates overshoots with only five of them.
  config.server.optimizer = 'sgdm'
  config.server.learning_rate = 1.0
  config.server.momentum = 0.0
  return config
