"""A few rounds on a little phantom data: what the tests and a quick check use."""

from tff_medical.training import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'phantoms'
  config.num_per_category = 100
  config.num_clients = 200
  config.clients_per_round = 20
  config.total_rounds = 3
  config.eval_every = 2
  config.model.conv_filters = (8, 16)
  # 20 clients a round cannot keep TFF's clipped-count noise small at these multipliers, nor
  # the value noise within 5% once whole-client removal (every count moves) is accounted.
  config.clip.max_count_noise_fraction = 0.5
  config.clip.max_value_noise_inflation = 1.25
  return config
