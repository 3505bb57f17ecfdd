"""A site's work in a round, encoded for SecAgg+; the site's own example-level ledger.

Client and example level at a site, and what stays there: docs/DESIGN.md.
"""

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional

from absl import logging
import ml_collections
import numpy as np

from tff_medical import categories
from tff_medical import fileio
from tff_medical.crosssilo import mechanism
from tff_medical.crosssilo import provisioning
from tff_medical.data import model_input
from tff_medical.data import source as source_lib
from tff_medical.errors import ConfigError
from tff_medical.errors import PolicyError
from tff_medical.models import cnn
from tff_medical.privacy import accounting
from tff_medical.privacy import example_ledger
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy.sampling import SamplingSpec
from tff_medical.training import dp_sgd
from tff_medical.training import example_level
from tff_medical.training import local_training

# Round instruction keys (coordinator -> site). Values are plain JSON strings or numbers.
KEY_ROUND = 'round'
KEY_PLAN = 'plan'
KEY_PARAMS = 'params'
KEY_MODEL = 'model'
KEY_CLIENT = 'client'
KEY_SEED = 'seed'
KEY_ROTATION = 'rotation_seed'  # The round's public rotation (mechanism.encode_unit_vector).
# Example level: the unit, the public settings (JSON, `example_settings`), the report query.
KEY_UNIT = 'privacy_unit'
KEY_EXAMPLE = 'example_dp'
KEY_QUERY = 'query'
QUERY_EXAMPLE_REPORT = 'example_report'
STATE_SCHEMA = 1
# The settings a site's ledger depends on: a run that changes one cannot continue its ledger.
_PRIVACY_SETTINGS = ('policy', 'accountant', 'batch_size', 'l2_norm_clip', 'local_steps')
_RUN_ID = re.compile(r'[0-9a-f]{8,64}')


def example_settings(config, policy: policy_lib.PrivacyPolicy, run_id: str) -> dict[str, Any]:
  """The public example-level settings the coordinator sends (config: a training config)."""
  return {'run': run_id, 'policy': policy.to_json_dict(), 'accountant': str(config.accountant),
          'batch_size': int(config.client.batch_size),
          'learning_rate': float(config.client.learning_rate),
          'l2_norm_clip': float(config.example_dp.l2_norm_clip),
          'local_steps': int(config.example_dp.local_steps),
          'total_rounds': int(config.total_rounds),
          'update_l2_bound': float(config.example_dp.update_l2_bound)}


def _rotation_seed(config: Mapping[str, Any]) -> int:
  seed = config.get(KEY_ROTATION)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ConfigError(f'round instructions must carry {KEY_ROTATION}, a non-negative integer. '
                      f'Found {seed!r}.')
  return seed


def _parse_settings(config: Mapping[str, Any]) -> dict[str, Any]:
  try:
    settings = json.loads(config[KEY_EXAMPLE])
    for key in ('batch_size', 'local_steps', 'total_rounds'):
      accounting.positive_int(key, settings[key])
    for key in ('learning_rate', 'l2_norm_clip', 'update_l2_bound'):
      accounting.positive(key, settings[key])
    accounting.as_accountant(settings['accountant'])
    policy_lib.policy_from_dict(settings['policy'])
    run = settings['run']
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f'example-level instructions must carry {KEY_EXAMPLE} with valid '
                      f'settings. Found keys {sorted(config)} ({e}).') from None
  if not isinstance(run, str) or not _RUN_ID.fullmatch(run):
    raise ConfigError(f'the run id must be 8-64 lowercase hex digits. Found {run!r}.')
  return settings


@dataclasses.dataclass(frozen=True)
class ExampleReport:
  """What a site tells the coordinator before a round (JSON; privacy figures, no data).

  spec: its example sampling (n, b) and planned multipliers; events: what the next round will
  spend per category (None: frozen at the site), from dp_sgd.round_events, i.e. exactly what
  its trainer applies; steps_released: its own ledger's steps so far (the coordinator refuses a
  site that reports fewer than it has recorded: the site lost its ledger).
  """

  site: str
  run: str
  spec: example_ledger.SiteSpec
  events: dict[str, Optional[Any]]
  steps_released: dict[str, int]

  @property
  def releasable(self) -> tuple[str, ...]:
    return tuple(c for c in categories.CATEGORY_IDS if self.events[c] is not None)

  def to_json(self) -> str:
    events = {}
    for c in categories.CATEGORY_IDS:
      if self.events[c] is None:
        events[c] = None
      else:
        q, z, steps = example_ledger.parse_step_event(self.events[c])
        events[c] = {'rate': q, 'noise_multiplier': z, 'steps': steps}
    return json.dumps({'site': self.site, 'run': self.run,
                       'sampling': self.spec.sampling.to_json_dict(),
                       'planned_noise_multipliers': dict(self.spec.noise_multipliers),
                       'events': events, 'steps_released': self.steps_released}, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> 'ExampleReport':
    """Parses and checks a report; PolicyError naming what is wrong."""
    try:
      raw = json.loads(text)
      site = provisioning.check_site_name(raw['site'])
      spec = example_ledger.SiteSpec(SamplingSpec.from_json_dict(raw['sampling']),
                                     raw['planned_noise_multipliers'])
      events = {}
      for c in categories.CATEGORY_IDS:
        e = raw['events'][c]
        events[c] = None if e is None else dp_sgd.step_event(
            accounting.positive('noise_multiplier', e['noise_multiplier']),
            accounting.positive('rate', e['rate']), accounting.positive_int('steps', e['steps']))
      steps = {c: int(raw['steps_released'][c]) for c in categories.CATEGORY_IDS}
      if any(v < 0 for v in steps.values()):
        raise PolicyError(f'steps_released must be non-negative. Found {steps}.')
      return cls(site, str(raw['run']), spec, events, steps)
    except (KeyError, TypeError, ValueError) as e:
      raise PolicyError(f'a site report must be the JSON of ExampleReport. Found an invalid '
                        f'one ({type(e).__name__}: {e}).') from None


class ExampleSite:
  """This site's own part of the example-level ledger in one run: plan, ledger, Poisson secret.

  Kept in state_dir/<run id>.json, owner-only (it holds the secret), and written before the
  site's update leaves the process: a restarted site resumes its spend, never restarts it. The
  ledger counts every round the site trained and uploaded, released or not (a round abandoned
  after the upload still counts here), so it is never below what the coordinator records.
  """

  def __init__(self, state_dir: str, site: str, labels: np.ndarray, settings: Mapping[str, Any]):
    self.site = site
    self.run = settings['run']
    self._path = os.path.join(state_dir, f'{self.run}.json')
    self._privacy = {k: settings[k] for k in _PRIVACY_SETTINGS}
    policy = policy_lib.policy_from_dict(settings['policy'])
    saved = None
    if os.path.exists(self._path):
      try:
        with open(self._path) as f:
          saved = json.load(f)
        plan = dp_sgd.SitePlan.from_json_dict(saved['plan'])
      except (OSError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f'the site\'s ledger {self._path} must be readable. It is not ({e}); '
                          'restore it from backup: starting over would restart the budget.'
                          ) from None
      if saved.get('privacy') != self._privacy or saved.get('site') != site:
        raise ConfigError(f'the site\'s ledger {self._path} was kept under other settings or '
                          'another site name than this run now sends; it cannot be continued.')
      counts = np.bincount(labels, minlength=categories.NUM_CATEGORIES).tolist()
      if [plan.category_counts[c] for c in categories.CATEGORY_IDS] != counts:
        raise ConfigError(f'the site\'s data must be what its ledger was started with '
                          f'({plan.examples} examples, per category {plan.category_counts}). '
                          f'Found {len(labels)} examples, per category {counts}.')
    else:
      plan = example_level.plan_site(ml_collections.ConfigDict({
          'client': {'batch_size': settings['batch_size']},
          'example_dp': {'local_steps': settings['local_steps'],
                         'l2_norm_clip': settings['l2_norm_clip']},
          'accountant': settings['accountant'], 'total_rounds': settings['total_rounds']}),
          policy, labels, site)
    self.plan = plan
    self.local_steps = int(settings['local_steps'])
    self.ledger = example_level.RunLedger(
        policy, {'sites': {site: plan.to_json_dict()}}, self.local_steps,
        settings['accountant'], SamplingSpec('poisson', 1, 1),
        state=None if saved is None else saved['ledger'])
    if saved is None:
      self._save()

  def _save(self) -> None:
    fileio.write_atomic(self._path, json.dumps({
        'schema_version': STATE_SCHEMA, 'site': self.site, 'run': self.run,
        'privacy': self._privacy, 'plan': self.plan.to_json_dict(),
        'ledger': self.ledger.state()}, indent=1) + '\n', mode=0o600)

  def report(self) -> ExampleReport:
    released = self.ledger.site_releasable(self.site)
    example = self.ledger.example
    return ExampleReport(
        self.site, self.run, example.site_spec(self.site),
        dp_sgd.round_events(self.plan, released, self.local_steps),
        {c: example.site_steps_released(self.site, c) for c in categories.CATEGORY_IDS})

  def train(self, trainer: dp_sgd.DPSGDTrainer, weights, x, y,
            round_num: int) -> dp_sgd.ExampleOutput:
    """One round of DP-SGD, recorded and saved here before anything is returned."""
    released = self.ledger.site_releasable(self.site)
    if not released:
      raise PolicyError(f'site {self.site} must not train: every category is exhausted here.')
    # A fresh Poisson draw for every attempt (the attempt count is in the saved ledger): a round
    # retried after an abandoned one must not reuse the batches of an upload already counted.
    attempt = self.ledger.example.rounds_completed
    output = trainer.train(weights, x, y, plan=self.plan, released=released,
                           sampling_seed=self.ledger.sampling_seed(round_num, attempt))
    self.ledger.record({self.site: output}, None)
    self._save()
    return output


_DP_TRAINERS: dict[str, dp_sgd.DPSGDTrainer] = {}


def _model_fn(model: Mapping[str, Any]):
  return lambda: cnn.build_cnn(tuple(model['conv_filters']), int(model['dense_units']),
                               seed=int(model['seed']),
                               input_pooling=int(model.get('input_pooling', 1)),
                               head=str(model.get('head', 'gap')))


class SiteWorker:
  """Holds a site's images; turns each round's instructions into its encoded SecAgg+ input."""

  def __init__(self, images: source_lib.LabeledImages, site_seed: int = 0,
               tamper: Optional[Callable[[np.ndarray], np.ndarray]] = None,
               site_name: Optional[str] = None, state_dir: Optional[str] = None):
    """site_name and state_dir: example level only (the site's ledger id and its folder)."""
    if len(images) == 0:
      raise ConfigError('a site must hold at least one image. Found none.')
    self._x = model_input.to_model_input(images.images)
    self._y = np.asarray(images.labels, np.int32)
    self._site_seed = int(site_seed)
    self._trainers: dict[str, local_training.LocalTrainer] = {}
    self._queries: dict[str, Any] = {}
    self._site_name = site_name
    self._state_dir = state_dir
    self._example_sites: dict[str, ExampleSite] = {}
    # Test hook: replaces the encoded vector, as a malicious or broken site would.
    self._tamper = tamper
    self.rounds_done = 0

  def _trainer(self, model: Mapping[str, Any], client: Mapping[str, Any]):
    key = json.dumps([model, client], sort_keys=True)
    if key not in self._trainers:
      self._trainers[key] = local_training.LocalTrainer(
          _model_fn(model), float(client['learning_rate']), int(client['batch_size']),
          int(client['local_epochs']))
    return self._trainers[key]

  def _example_site(self, settings: Mapping[str, Any]) -> ExampleSite:
    if self._site_name is None or self._state_dir is None:
      raise ConfigError('an example-level run needs the site\'s name and a state folder for '
                        'its ledger. Found this site started without them.')
    run = settings['run']
    if run not in self._example_sites:
      self._example_sites[run] = ExampleSite(self._state_dir, self._site_name, self._y,
                                             settings)
    return self._example_sites[run]

  def report(self, config: Mapping[str, Any]) -> str:
    """get_properties: the example-level report for the run in `config`."""
    if config.get(KEY_QUERY) != QUERY_EXAMPLE_REPORT:
      raise ConfigError(f'a query must be {KEY_QUERY}={QUERY_EXAMPLE_REPORT!r}. '
                        f'Found {config.get(KEY_QUERY)!r}.')
    return self._example_site(_parse_settings(config)).report().to_json()

  def _fit_example(self, weights: list[np.ndarray], config: Mapping[str, Any]) -> np.ndarray:
    settings = _parse_settings(config)
    try:
      model = json.loads(config[KEY_MODEL])
      round_num = int(config[KEY_ROUND])
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f'round instructions must carry {KEY_MODEL} and {KEY_ROUND}. '
                        f'Found keys {sorted(config)} ({e}).') from None
    key = json.dumps([model, settings['learning_rate'], settings['local_steps']], sort_keys=True)
    if key not in _DP_TRAINERS:  # One per process and settings (compiling takes seconds).
      _DP_TRAINERS[key] = dp_sgd.DPSGDTrainer(_model_fn(model), settings['learning_rate'],
                                              settings['local_steps'])
    output = self._example_site(settings).train(_DP_TRAINERS[key], weights, self._x, self._y,
                                                round_num)
    delta = output.sub_updates[0]
    norm = float(np.sqrt(sum(np.sum(np.asarray(u, np.float64)**2) for u in delta)))
    if norm > settings['update_l2_bound']:
      logging.warning('Round %d: update norm %.4g clipped to update_l2_bound %.4g.', round_num,
                      norm, settings['update_l2_bound'])
    return mechanism.encode_site_update(delta, settings['update_l2_bound'],
                                        _rotation_seed(config))

  def _category_queries(self, plan_json: str):
    if plan_json not in self._queries:
      self._queries = {plan_json: mechanism.category_queries(
          mechanism.MechanismPlan.from_json(plan_json))}
    return self._queries[plan_json]

  def fit(self, weights: list[np.ndarray], config: Mapping[str, Any]) -> np.ndarray:
    if config.get(KEY_UNIT) == 'example':
      vector = self._fit_example(weights, config)
    else:
      vector = self._fit_client(weights, config)
    if self._tamper is not None:
      vector = self._tamper(vector)
    self.rounds_done += 1
    return vector

  def _fit_client(self, weights: list[np.ndarray], config: Mapping[str, Any]) -> np.ndarray:
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
    return mechanism.encode_site_records(self._category_queries(plan_json), params,
                                         output.sub_updates, _rotation_seed(config))
