"""A site's work in a round: local per-category training, then the DP record, encoded for SecAgg+.

The math is the simulation's: LocalTrainer for the sub-updates, and the same DPQuery's
preprocess_record (mechanism.encode_site_records) with the clip norms the coordinator derived.
Everything the site needs arrives in the round's instructions (model shape, client settings,
the public mechanism plan and sample params); the site's images never leave this process.
"""

import json
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from tff_medical.crosssilo import mechanism
from tff_medical.data import source as source_lib
from tff_medical.errors import ConfigError
from tff_medical.models import cnn
from tff_medical.training import local_training

# Round instruction keys (coordinator -> site). Values are plain JSON strings or numbers.
KEY_ROUND = 'round'
KEY_PLAN = 'plan'
KEY_PARAMS = 'params'
KEY_MODEL = 'model'
KEY_CLIENT = 'client'
KEY_SEED = 'seed'


class SiteWorker:
  """Holds a site's images; turns each round's instructions into its encoded SecAgg+ input."""

  def __init__(self, images: source_lib.LabeledImages, site_seed: int = 0,
               tamper: Optional[Callable[[np.ndarray], np.ndarray]] = None):
    if len(images) == 0:
      raise ConfigError('a site must hold at least one image. Found none.')
    self._x = images.images[..., np.newaxis].astype(np.float32) / 255.0
    self._y = np.asarray(images.labels, np.int32)
    self._site_seed = int(site_seed)
    self._trainers: dict[str, local_training.LocalTrainer] = {}
    self._queries: dict[str, Any] = {}
    # Test hook: replaces the encoded vector, as a malicious or broken site would.
    self._tamper = tamper
    self.rounds_done = 0

  def _trainer(self, model: Mapping[str, Any], client: Mapping[str, Any]):
    key = json.dumps([model, client], sort_keys=True)
    if key not in self._trainers:
      self._trainers[key] = local_training.LocalTrainer(
          lambda: cnn.build_cnn(tuple(model['conv_filters']), int(model['dense_units']),
                                seed=int(model['seed']),
                                input_pooling=int(model.get('input_pooling', 1)),
                                head=str(model.get('head', 'gap'))),
          float(client['learning_rate']), int(client['batch_size']),
          int(client['local_epochs']))
    return self._trainers[key]

  def _category_queries(self, plan_json: str):
    if plan_json not in self._queries:
      self._queries = {plan_json: mechanism.category_queries(
          mechanism.MechanismPlan.from_json(plan_json))}
    return self._queries[plan_json]

  def fit(self, weights: list[np.ndarray], config: Mapping[str, Any]) -> np.ndarray:
    try:
      model = json.loads(config[KEY_MODEL])
      client = json.loads(config[KEY_CLIENT])
      params = json.loads(config[KEY_PARAMS])
      plan_json = str(config[KEY_PLAN])
      round_num = int(config[KEY_ROUND])
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f'round instructions must carry {KEY_MODEL}, {KEY_CLIENT}, {KEY_PARAMS}, '
                        f'{KEY_PLAN} and {KEY_ROUND}. Found keys {sorted(config)} ({e}).') from None
    trainer = self._trainer(model, client)
    output = trainer.train(weights, self._x, self._y,
                           shuffle_seed=(int(config.get(KEY_SEED, 0)), round_num,
                                         self._site_seed))
    vector = mechanism.encode_site_records(self._category_queries(plan_json), params,
                                           output.sub_updates)
    if self._tamper is not None:
      vector = self._tamper(vector)
    self.rounds_done += 1
    return vector
