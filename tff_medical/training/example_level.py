"""privacy_unit 'example' in the training program: site plans, server aggregation, ledgers.

The pieces: docs/DESIGN.md; stacked client-level noise: docs/PRIVACY.md.
"""

import dataclasses
import json
import os
import secrets
from typing import Any, Mapping, Optional

import numpy as np

from tff_medical import categories
from tff_medical import fileio
from tff_medical.aggregation import class_aware
from tff_medical.errors import ConfigError
from tff_medical.errors import PolicyError
from tff_medical.privacy import calibration
from tff_medical.privacy import example_ledger
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy.sampling import SamplingSpec
from tff_medical.training import dp_sgd

FIRST = categories.CATEGORY_IDS[0]


def is_example(config) -> bool:
  return config.get('privacy_unit', 'client') == 'example'


def stacked(config) -> bool:
  return is_example(config) and bool(config.example_dp.stack_client_level)


def calibrate(config, policy, labels: np.ndarray, partition,
              sampling_spec: SamplingSpec) -> dict[str, Any]:
  """{'sites': {site id: SitePlan JSON}, 'client_noise_multiplier', 'client_split'}."""
  sites = {}
  for site_id in partition.client_ids:
    plan = plan_site(config, policy, np.asarray(labels)[partition.train_indices(site_id)],
                     site_id)
    sites[site_id] = plan.to_json_dict()
  result = {'sites': sites, 'client_noise_multiplier': None, 'client_split': None}
  if stacked(config):
    noise = calibration.calibrate_category_noise(policy, sampling_spec, config.total_rounds,
                                                config.accountant)
    z = max(noise.values())
    split = calibration.choose_clipped_count_stddev(
        z, sampling_spec.expected_clients_per_round,
        max_value_noise_inflation=config.clip.max_value_noise_inflation,
        max_count_noise_fraction=config.clip.max_count_noise_fraction)
    result.update(client_noise_multiplier=z, client_split=split.to_json_dict())
  return result


_CALIBRATED: dict[tuple, dp_sgd.SitePlan] = {}


def plan_site(config, policy, labels: np.ndarray, site_id: str,
              total_rounds: Optional[int] = None) -> dp_sgd.SitePlan:
  """One site's SitePlan from its training labels: q = b / n, planned steps = local steps x
  total_rounds (config.total_rounds unless given); the simulation's sites and a cross-silo
  site alike."""
  counts = np.bincount(np.asarray(labels, np.int64), minlength=categories.NUM_CATEGORIES)
  counts = {c: int(counts[i]) for i, c in enumerate(categories.CATEGORY_IDS)}
  size = sum(counts.values())
  if size < config.client.batch_size:
    raise ConfigError(f'client.batch_size must be at most every site\'s training examples '
                      f'(site {site_id} has {size}). Found {config.client.batch_size}.')
  steps = config.example_dp.local_steps * (total_rounds or config.total_rounds)
  key = (size, config.client.batch_size, steps, float(config.example_dp.l2_norm_clip),
         str(config.accountant), json.dumps(policy.to_json_dict(), sort_keys=True))
  if key not in _CALIBRATED:
    # Calibration (seconds) depends on the site's size only (q = b / n), not on its mix.
    if len(_CALIBRATED) > 256:
      _CALIBRATED.clear()
    _CALIBRATED[key] = dp_sgd.plan_site(policy, counts, config.client.batch_size, steps,
                                        config.example_dp.l2_norm_clip, config.accountant)
  noise = _CALIBRATED[key].noise_multipliers
  return dataclasses.replace(_CALIBRATED[key], category_counts=counts,
                             scale=dp_sgd.data_weighted_scale(noise, counts))


def site_plans(example_plan: Mapping[str, Any]) -> dict[str, dp_sgd.SitePlan]:
  return {site_id: dp_sgd.SitePlan.from_json_dict(raw)
          for site_id, raw in example_plan['sites'].items()}


def make_factory(example_plan: Mapping[str, Any],
                 clip: class_aware.AdaptiveClipSettings) -> class_aware.ClassAwareFactory:
  if example_plan.get('client_split') is None:
    return class_aware.ClassAwareFactory.non_private()
  split = calibration.AdaptiveClipSplit.from_json_dict(example_plan['client_split'])
  weights = {c: 1.0 if c == FIRST else 0.0 for c in categories.CATEGORY_IDS}
  return class_aware.ClassAwareFactory.dp({c: split for c in categories.CATEGORY_IDS}, clip,
                                          combination_weights=weights)


class LedgerView:
  """An example ledger (plus, when stacked, the client-level one) as a run reports and saves
  it: per-category figures and status, the published JSON. The cross-silo coordinator uses it
  over the ledger it builds from the sites' reports; RunLedger adds the simulation's sites."""

  def __init__(self, example: example_ledger.ExampleLevelLedger,
               client: Optional[ledger_lib.PrivacyLedger] = None):
    self.example = example
    self.client = client
    self._client_released = self._client_releasable()

  def _client_releasable(self) -> tuple[str, ...]:
    return categories.CATEGORY_IDS if self.client is None else self.client.releasable()

  def site_releasable(self, site_id: str) -> tuple[str, ...]:
    """Categories the site may still train on: within its example budget and the client one."""
    return tuple(c for c in self.example.releasable(site_id) if c in self._client_released)

  def releasable(self) -> tuple[str, ...]:
    """Categories some site may still train on."""
    self._client_released = self._client_releasable()
    return tuple(c for c in categories.CATEGORY_IDS
                 if any(c in self.site_releasable(s) for s in self.example.sites))

  def epsilon_spent(self, category_id: str) -> float:
    return self.example.epsilon_spent(category_id)

  def status(self, category_id: str) -> ledger_lib.CategoryStatus:
    exhausted = all(self.example.site_status(s, category_id) == 'exhausted'
                    for s in self.example.sites) or category_id not in self._client_released
    return ledger_lib.CategoryStatus.EXHAUSTED if exhausted else ledger_lib.CategoryStatus.ACTIVE

  @property
  def client_level_epsilon(self) -> float:
    """The stacked client-level figure; without stacking, the example-level one."""
    return (self.client.client_level_epsilon if self.client is not None else
            self.example.example_level_epsilon)

  @property
  def all_exhausted(self) -> bool:
    return not self.releasable()

  def to_json_dict(self) -> dict[str, Any]:
    if self.client is None:
      return self.example.to_json_dict()
    return self.example.to_json_dict(self.client.client_level_epsilon,
                                     example_ledger.CLIENT_LEDGER_FILENAME)

  def save(self, run_dir: str) -> None:
    if self.client is not None:
      payload = self.client.to_json_dict()
      ledger_lib.validate_ledger_json(payload)
      fileio.write_atomic(os.path.join(run_dir, example_ledger.CLIENT_LEDGER_FILENAME),
                          json.dumps(payload, indent=2, allow_nan=False) + '\n')
    payload = self.to_json_dict()
    example_ledger.validate_example_ledger_json(payload)
    fileio.write_atomic(os.path.join(run_dir, ledger_lib.LEDGER_FILENAME),
                        json.dumps(payload, indent=2, allow_nan=False) + '\n')


class RunLedger(LedgerView):
  """The simulation's ledger: its sites' plans, the Poisson secret, round recording."""

  def __init__(self, policy, example_plan: Mapping[str, Any], local_steps: int, accountant,
               sampling_spec: SamplingSpec, state: Optional[Mapping[str, Any]] = None):
    plans = site_plans(example_plan)
    specs = {site_id: example_ledger.SiteSpec(plan.sampling, plan.noise_multipliers)
             for site_id, plan in plans.items()}
    self.plans = plans
    z = example_plan.get('client_noise_multiplier')
    if state is None:
      example = example_ledger.ExampleLevelLedger(policy, specs, local_steps, accountant,
                                                  sampling_spec)
      client = (None if z is None else ledger_lib.PrivacyLedger(
          policy, {c: z for c in categories.CATEGORY_IDS}, sampling_spec, accountant))
    else:
      example = example_ledger.ExampleLevelLedger.from_state(state['example'], policy,
                                                             specs, accountant)
      client = (None if state.get('client') is None else ledger_lib.PrivacyLedger.from_state(
          state['client'], policy, sampling=sampling_spec, accountant=accountant))
    super().__init__(example, client)
    # Amplification by sampling assumes nobody outside the site knows which examples a batch
    # drew, so the Poisson draws are seeded by a per-run secret kept in the checkpoint only (not
    # by the public config seed): a resumed run repeats them, an observer cannot.
    self._sampling_secret = (secrets.randbits(64) if state is None else
                             int(state['sampling_secret']))

  def sampling_seed(self, round_num: int, position: int) -> tuple[int, int, int]:
    return (self._sampling_secret, int(round_num), int(position))

  def state(self) -> dict[str, Any]:
    return {'example': self.example.state(),
            'client': None if self.client is None else self.client.state(),
            'sampling_secret': self._sampling_secret}

  def record(self, site_outputs: Mapping[str, dp_sgd.ExampleOutput], aggregator_state) -> None:
    """Records the round: each site's DP-SGD events, and the stacked client-level event."""
    client_events = None
    if self.client is not None:
      events = class_aware.dp_events(aggregator_state)[FIRST]
      if events is None:
        raise PolicyError(f'the stacked client-level aggregator must release its {FIRST} slot.')
      # Only the first slot reaches the model (the others have weight 0 and publish nothing), so
      # a whole site moves one count by 0.5: relation (b) is within relation (a)'s event.
      event = events.remove_category_examples
      # The combined update carries every category the sites trained on this round.
      trained = set()
      for output in site_outputs.values():
        trained.update(c for c, e in output.dp_events.items() if e is not None)
      client_events = {c: event if c in trained else None for c in categories.CATEGORY_IDS}
    self.example.record_round({s: o.dp_events for s, o in site_outputs.items()})
    if client_events is not None:
      self.client.record_round(client_events)
