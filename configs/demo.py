"""Demo: the embedded phantom data, DP with the seed policy, sized for 2 CPU cores.

Run: make demo   (or: .venv/bin/python experiments/train.py --config=configs/demo.py)

Chosen on a validation set drawn apart from the test split (docs/BENCHMARKS.md, "Tuning"):
the levers that matter under DP are the number of clients (noise per coordinate ~ z*C/m, and
z falls with the sampling rate), the model's parameter count, and a model that learns in the
few rounds a budget affords.
"""

from tff_medical.training import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'phantoms'
  config.num_per_category = 1500
  # One image a client (8,100 clients after the 10% test split), like one patient a client:
  # many clients, each sampled rarely, is what makes budgets of 0.5 affordable.
  config.num_clients = 8100
  config.holdout_fraction = 0.0
  config.clients_per_round = 200
  config.total_rounds = 100
  config.partition = 'iid'
  # 16x16 average-pooled input, one conv layer, flatten head: 3,158 parameters. A global-average
  # pooling head needs several hundred rounds to learn the layouts that tell the categories apart.
  config.model.input_pooling = 4
  config.model.conv_filters = (8,)
  config.model.head = 'flatten'
  config.client.learning_rate = 0.2
  config.server.optimizer = 'adam'
  config.server.learning_rate = 0.02
  # A client holds one image, so for each category 5 of 6 sampled clients send a zero
  # sub-update, which counts as unclipped: a target of 5/6 + 1/6 * 0.5 puts the clip near the
  # median norm of the clients that do hold the category (0.5 would collapse the clip).
  config.clip.target_unclipped_quantile = 0.92
  config.eval_every = 10
  return config
