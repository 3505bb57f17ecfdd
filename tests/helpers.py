"""What several test modules need: the repository's configs, and epsilon from dp_accounting alone."""

import importlib.util
import json
import os
import re

import dp_accounting
from dp_accounting import rdp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
  """configs/<name>.py's get_config(), as train.py's --config flag loads it."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def smoke_config(**overrides):
  """configs/smoke.py cut to a few seconds a run: 100 clients, 10 a round, 4 rounds, one filter.

  Args:
    **overrides: config fields to set; a dotted key ('model.conv_filters') sets a nested field.
  """
  config = load_config('smoke')
  config.num_per_category = 40
  config.num_clients = 100
  config.clients_per_round = 10
  config.total_rounds = 4
  config.eval_every = 4
  config.model.conv_filters = (4,)
  # 10 clients a round need much clipped-count noise at the seed policy's multipliers; the
  # clip's quality is not what these tests are about, so allow the most the config accepts.
  config.clip.max_count_noise_fraction = 1.0
  config.export = False
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def reference_epsilon(groups, delta, fixed_size=None):
  """Epsilon by a fresh dp_accounting RDP accountant, one compose per round: the independent figure.

  Args:
    groups: (rate, z, rounds) triples: `rounds` Poisson-sampled Gaussians of multiplier z at
      sampling rate `rate`; rate 1.0 is every client, a plain Gaussian.
    delta: the delta of the (epsilon, delta) guarantee.
    fixed_size: (n, m) for m of n sampled without replacement, under replace-one (a replaced
      client moves the sum by twice the clip, hence z / 2); rate is then not used.
  """
  if fixed_size:
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  else:
    accountant = rdp.RdpAccountant()
  for rate, z, rounds in groups:
    if fixed_size:
      event = dp_accounting.SampledWithoutReplacementDpEvent(
          *fixed_size, dp_accounting.GaussianDpEvent(z / 2))
    elif rate == 1:
      event = dp_accounting.GaussianDpEvent(z)
    else:
      event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(z))
    for _ in range(rounds):
      accountant.compose(event)
  return accountant.get_epsilon(delta)


def page_data(path):
  """A built dashboard page's text, and the run data embedded in it as JSON."""
  with open(path, encoding='utf-8') as f:
    page = f.read()
  match = re.search(r'<script type="application/json" id="dashboard-data">(.*?)</script>', page,
                    re.S)
  return page, json.loads(match.group(1))


def random_weights_cnn():
  """cnn.build_cnn((4, 8)) with random, not initial, weights (biases too: a variable lost in an
  export would show), the same draw every time."""
  from tff_medical.models import cnn  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  keras_model = cnn.build_cnn(conv_filters=(4, 8), seed=3)
  rng = np.random.default_rng(1)
  keras_model.set_weights([
      rng.normal(scale=1.0 if w.ndim > 1 else 0.2, size=w.shape).astype(np.float32)
      for w in keras_model.get_weights()])
  return keras_model


def assert_gaussian_noise(noise, expected_std: float) -> None:
  """`noise` looks like i.i.d. N(0, expected_std^2): its sample variance within the two-sided
  99.9% chi-square interval, its mean within 4 standard errors."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  noise = np.asarray(noise, np.float64).ravel()
  low, high = stats.chi2.ppf([0.0005, 0.9995], df=noise.size) / noise.size
  variance_ratio = np.mean(noise**2) / expected_std**2
  assert low < variance_ratio < high, (variance_ratio, low, high)
  assert abs(np.mean(noise)) < 4 * expected_std / np.sqrt(noise.size)
