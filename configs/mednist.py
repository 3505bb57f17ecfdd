"""MedNIST (58,954 images) across one-patient clients: the full-size federated setting.

Place MedNIST.tar.gz or the extracted MedNIST/ folder in data_dir, then:
  .venv/bin/python experiments/train.py --config=configs/mednist.py --config.data_dir=/path
"""

from tff_medical.training import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'mednist'
  config.data_dir = ''
  config.num_clients = 20000
  config.clients_per_round = 1000
  config.total_rounds = 300
  config.partition = 'dirichlet'
  config.dirichlet_alpha = 0.5
  config.eval_every = 20
  return config
