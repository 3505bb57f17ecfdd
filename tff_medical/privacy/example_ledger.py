"""The example-level privacy ledger (privacy_unit 'example'): per site, per category.

What it accounts (DP-SGD steps per site, the worst-site guarantee) is in docs/PRIVACY.md.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Union

import dp_accounting

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import budget
from tff_medical.privacy import ledger_schema as schema
from tff_medical.privacy.accounting import Accountant
from tff_medical.privacy.policy import PrivacyPolicy
from tff_medical.privacy.sampling import SamplingMethod
from tff_medical.privacy.sampling import SamplingSpec

SCHEMA_VERSION = schema.EXAMPLE_SCHEMA_VERSION
PRIVACY_UNIT = schema.EXAMPLE_PRIVACY_UNIT
WHOLE_GUARANTEE = schema.WHOLE_GUARANTEE
STATEMENT = schema.EXAMPLE_STATEMENT
CLIENT_LEDGER_FILENAME = 'privacy_ledger_client.json'


@dataclasses.dataclass(frozen=True)
class SiteSpec:
  """What the ledger needs of a site: its example sampling and planned multipliers."""

  sampling: SamplingSpec  # Poisson: total_clients = the site's examples, expected = batch.
  noise_multipliers: Mapping[str, float]

  def __post_init__(self):
    if not isinstance(self.sampling, SamplingSpec) or (
        self.sampling.method is not SamplingMethod.POISSON):
      raise PolicyError(f'a site\'s example sampling must be a Poisson SamplingSpec. '
                        f'Found {self.sampling!r}.')
    if (not isinstance(self.noise_multipliers, Mapping) or
        set(self.noise_multipliers) != set(categories.CATEGORY_IDS)):
      raise PolicyError(f'noise_multipliers must have exactly the six categories. '
                        f'Found {self.noise_multipliers!r}.')
    object.__setattr__(self, 'noise_multipliers', {
        c: accounting.positive(f'noise_multipliers[{c}]', self.noise_multipliers[c])
        for c in categories.CATEGORY_IDS})


def parse_step_event(event: dp_accounting.DpEvent) -> tuple[float, float, int]:
  """(q, z, steps) of SelfComposed(PoissonSampled(q, Gaussian(z)), steps); PolicyError else."""
  inner = getattr(event, 'event', None)
  gaussian = getattr(inner, 'event', None)
  if not (isinstance(event, dp_accounting.SelfComposedDpEvent) and
          isinstance(inner, dp_accounting.PoissonSampledDpEvent) and
          isinstance(gaussian, dp_accounting.GaussianDpEvent)):
    raise PolicyError('a site\'s round event must be SelfComposedDpEvent(PoissonSampledDpEvent('
                      f'q, GaussianDpEvent(z)), steps). Found {event!r}.')
  z = accounting.effective_noise_multiplier(gaussian)
  return float(inner.sampling_probability), z, accounting.positive_int('steps', event.count)


class ExampleLevelLedger(budget.BudgetLedger):
  """Per-site, per-category epsilon of example-level DP-SGD, with hard budgets per site."""

  def __init__(self,
               policy: PrivacyPolicy,
               sites: Mapping[str, SiteSpec],
               local_steps: int,
               accountant: Union[Accountant, str] = Accountant.RDP,
               site_sampling: Optional[SamplingSpec] = None):
    """Starts an empty ledger.

    Args:
      policy: The budgets (epsilon per category, shared delta).
      sites: Site id -> its example sampling and planned multipliers.
      local_steps: DP-SGD steps a site takes per round (predicts the next round's spend).
      accountant: RDP or PLD.
      site_sampling: How sites are drawn into rounds, for the record (the example-level
        guarantee does not count on it: a site is accounted for the rounds it took part in).
    """
    super().__init__(policy)
    if not isinstance(sites, Mapping) or not sites:
      raise PolicyError(f'sites must be a non-empty mapping of site id to SiteSpec. '
                        f'Found {sites!r}.')
    for site_id, spec in sites.items():
      if not isinstance(site_id, str) or not isinstance(spec, SiteSpec):
        raise PolicyError(f'sites must map site ids (str) to SiteSpec. Found {site_id!r}: '
                          f'{spec!r}.')
    self._accountant = accounting.check_sampling_accountant(
        next(iter(sites.values())).sampling, accountant)
    self._local_steps = accounting.positive_int('local_steps', local_steps)
    if site_sampling is None:
      site_sampling = SamplingSpec('poisson', len(sites), len(sites))
    if not isinstance(site_sampling, SamplingSpec) or site_sampling.total_clients != len(sites):
      raise PolicyError(f'site_sampling must be a SamplingSpec over the {len(sites)} sites. '
                        f'Found {site_sampling!r}.')
    self._site_sampling = site_sampling
    self._epsilon = budget.EpsilonCache(policy.delta, self._accountant)
    self._specs: dict[str, SiteSpec] = {}
    self._sites: dict[str, budget.CategoryBudgets] = {}
    self._rounds = 0
    for site_id, spec in sites.items():
      self._start_site(site_id, spec)

  def _start_site(self, site_id: str, spec: SiteSpec) -> None:
    # One relation (add or remove one image): a round holds (z,) per released category.
    self._specs[site_id] = spec
    self._sites[site_id] = budget.CategoryBudgets(
        self._policy, spec.sampling, {c: (z,) for c, z in spec.noise_multipliers.items()},
        self._epsilon)
    self._update_frozen(site_id)

  def _site(self, site_id: str) -> budget.CategoryBudgets:
    if site_id not in self._sites:
      raise PolicyError(f'site must be one of the ledger\'s sites. Found {site_id!r}.')
    return self._sites[site_id]

  def _update_frozen(self, site_id: str) -> None:
    self._sites[site_id].update_frozen(self._rounds, self._local_steps)

  # Public API.

  @property
  def sites(self) -> tuple[str, ...]:
    return tuple(self._sites)

  @property
  def local_steps(self) -> int:
    return self._local_steps

  @property
  def rounds_completed(self) -> int:
    return self._rounds

  def releasable(self, site_id: str) -> tuple[str, ...]:
    """Categories whose next round at this site keeps them within budget (others frozen)."""
    self._site(site_id)
    self._update_frozen(site_id)
    return tuple(c for c in categories.CATEGORY_IDS if c not in self._sites[site_id].frozen)

  @property
  def all_exhausted(self) -> bool:
    return all(len(s.frozen) == categories.NUM_CATEGORIES for s in self._sites.values())

  def site_epsilon(self, site_id: str, category_id: str) -> float:
    index = categories.label_of(category_id)
    return self._site(site_id).epsilon(index)

  def epsilon_spent(self, category_id: str) -> float:
    """The whole federation's figure for the category: the worst site's."""
    return max(self.site_epsilon(s, category_id) for s in self._sites)

  @property
  def example_level_epsilon(self) -> float:
    """For one example of any category: the largest category figure."""
    return max(self.epsilon_spent(c) for c in categories.CATEGORY_IDS)

  def site_steps_released(self, site_id: str, category_id: str) -> int:
    """Steps the site has released for the category, as recorded here."""
    return self._site(site_id).steps_released(categories.label_of(category_id))

  def site_spec(self, site_id: str) -> SiteSpec:
    self._site(site_id)
    return self._specs[site_id]

  def add_site(self, site_id: str, spec: SiteSpec) -> None:
    """Adds a site first seen after the ledger started (a cross-silo site joining late).

    Only for a ledger whose sites all take part in every round (site sampling rate 1), which
    stays so with the new site counted.
    """
    if not isinstance(site_id, str) or not site_id or not isinstance(spec, SiteSpec):
      raise PolicyError(f'add_site needs a site id (str) and a SiteSpec. Found {site_id!r}: '
                        f'{spec!r}.')
    if site_id in self._sites:
      raise PolicyError(f'site must be new to the ledger. Found {site_id!r}, already in it.')
    if self._site_sampling.rate != 1.0:
      raise PolicyError(f'add_site needs site sampling rate 1 (every site every round). Found '
                        f'{self._site_sampling!r}.')
    accounting.check_sampling_accountant(spec.sampling, self._accountant)
    count = len(self._sites) + 1
    self._site_sampling = SamplingSpec('poisson', count, count)
    self._start_site(site_id, spec)

  def site_status(self, site_id: str, category_id: str) -> str:
    categories.label_of(category_id)
    return self._site(site_id).status(category_id).value

  def record_round(self, site_events: Mapping[str, Mapping[str, Optional[dp_accounting.DpEvent]]]
                  ) -> None:
    """Records one round: the events of every site that took part (absent sites: none).

    Raises:
      PolicyError: for an unknown site or category, a malformed event, a sampling rate that is
        not the site's, an event for a frozen category, or one that would exceed a budget.
        Nothing is recorded then: the round must not be released.
    """
    if not isinstance(site_events, Mapping):
      raise PolicyError(f'site_events must map site ids to per-category events. '
                        f'Found {site_events!r}.')
    staged = {}
    for site_id, events in site_events.items():
      site = self._site(site_id)
      if not isinstance(events, Mapping):
        raise PolicyError(f'site_events[{site_id}] must map categories to events. '
                          f'Found {events!r}.')
      unknown = sorted(set(events) - set(categories.CATEGORY_IDS))
      if unknown:
        raise PolicyError(f'site_events[{site_id}] keys must be category ids. Found {unknown}.')
      zs, steps_seen = [], set()
      for index, c in enumerate(categories.CATEGORY_IDS):
        event = events.get(c)
        if event is None or isinstance(event, dp_accounting.NoOpDpEvent):
          zs.append(None)
          continue
        try:
          q, z, steps = parse_step_event(event)
        except PolicyError as e:
          raise PolicyError(f'site_events[{site_id}][{c}]: {e}') from None
        if not math.isclose(q, site.sampling.rate, rel_tol=schema.TOLERANCE):
          raise PolicyError(f'site_events[{site_id}][{c}] sampling probability must be the '
                            f'site\'s rate {site.sampling.rate!r}. Found {q!r}.')
        if c in site.frozen:
          raise PolicyError(f'site_events[{site_id}][{c}] must be None: the category is '
                            f'exhausted at this site. Found {event!r}.')
        after = site.epsilon(index, extra=(z, steps))
        target = self._policy.budget(c).epsilon
        if after > target:
          raise PolicyError(f'site_events[{site_id}][{c}] must keep epsilon within {target:g}. '
                            f'Found noise multiplier {z:.6g} over {steps} steps, which would '
                            f'spend {after:.6g}.')
        zs.append((z,))
        steps_seen.add(steps)
      if len(steps_seen) > 1:
        raise PolicyError(f'site_events[{site_id}] must all count the same steps (one batch '
                          f'serves every category). Found {sorted(steps_seen)}.')
      staged[site_id] = (tuple(zs), steps_seen.pop() if steps_seen else 0)
    for site_id, (zs, steps) in staged.items():
      if steps:
        self._sites[site_id].append(zs, steps)
    self._rounds += 1
    for site_id in self._sites:
      self._update_frozen(site_id)

  def to_json_dict(self, client_level_epsilon: Optional[float] = None,
                   client_level_ledger: Optional[str] = None) -> dict[str, Any]:
    """The published ledger; see `validate_example_ledger_json`.

    Args:
      client_level_epsilon: When client-level noise is stacked on top, its ledger's figure.
      client_level_ledger: The file name of that ledger.
    """
    site_entries = {}
    for site_id, site in self._sites.items():
      site_entries[site_id] = {
          'sampling': dict(site.sampling.to_json_dict(), rate=site.sampling.rate),
          'rounds_participated': site.rounds,
          'steps_completed': site.steps,
          'categories': {
              c: {
                  'target_epsilon': self._policy.budget(c).epsilon,
                  'noise_multiplier': site.noise_multiplier(i),
                  'rounds_released': site.rounds_released(i),
                  'steps_released': site.steps_released(i),
                  'epsilon_spent': site.epsilon(i),
                  'status': self.site_status(site_id, c),
              } for i, c in enumerate(categories.CATEGORY_IDS)
          },
      }
    whole = {}
    for b in self._policy.budgets:
      entries = [s['categories'][b.id] for s in site_entries.values()]
      worst = max(entries, key=lambda e: (e['epsilon_spent'], -e['noise_multiplier']))
      whole[b.id] = {
          'display_name': b.display_name,
          'privacy_level': b.privacy_level.value,
          'target_epsilon': b.epsilon,
          'noise_multiplier': worst['noise_multiplier'],
          'rounds_released': max(e['rounds_released'] for e in entries),
          'epsilon_spent': worst['epsilon_spent'],
          'status': ('exhausted' if all(e['status'] == 'exhausted' for e in entries)
                     else 'active'),
      }
    return {
        'schema_version': SCHEMA_VERSION,
        'accountant': self._accountant.value,
        'privacy_unit': PRIVACY_UNIT,
        'neighboring_relation': 'add_or_remove_one',
        'delta': self._policy.delta,
        'sampling': dict(self._site_sampling.to_json_dict(), rate=self._site_sampling.rate),
        'rounds_completed': self._rounds,
        'local_steps_per_round': self._local_steps,
        'whole_guarantee': WHOLE_GUARANTEE,
        'statement': STATEMENT,
        'example_level_epsilon': max(e['epsilon_spent'] for e in whole.values()),
        'client_level_epsilon': client_level_epsilon,
        'client_level_ledger': client_level_ledger,
        'categories': {b.id: whole[b.id] for b in self._policy.budgets},
        'sites': site_entries,
    }

  def save(self, run_dir: str, **kwargs) -> str:
    """Writes privacy_ledger.json atomically (kwargs: see `to_json_dict`); returns its path."""
    return schema.write_ledger(run_dir, self.to_json_dict(**kwargs))

  def state(self) -> dict[str, Any]:
    """JSON-able checkpoint state: applied multipliers per round, not derived figures."""
    return {
        'schema_version': SCHEMA_VERSION,
        'privacy_unit': PRIVACY_UNIT,
        'accountant': self._accountant.value,
        'policy': self._policy.to_json_dict(),
        'local_steps': self._local_steps,
        'site_sampling': self._site_sampling.to_json_dict(),
        'rounds_completed': self._rounds,
        'sites': {
            site_id: {
                'sampling': site.sampling.to_json_dict(),
                'planned_noise_multipliers': dict(self._specs[site_id].noise_multipliers),
                'history': [{'noise_multipliers': {c: None if z is None else z[0]
                                                   for c, z in zip(categories.CATEGORY_IDS, zs)},
                             'steps': steps, 'rounds': rounds}
                            for zs, steps, rounds in site.history],
                'frozen': dict(site.frozen),
            } for site_id, site in self._sites.items()
        },
    }

  @classmethod
  def from_state(cls, state: Mapping[str, Any], policy: PrivacyPolicy,
                 sites: Optional[Mapping[str, SiteSpec]] = None,
                 accountant: Optional[Union[Accountant, str]] = None) -> 'ExampleLevelLedger':
    """Restores a ledger; refuses one saved under another policy, sites or accountant."""
    if not isinstance(state, Mapping) or state.get('privacy_unit') != PRIVACY_UNIT or state.get(
        'schema_version') != SCHEMA_VERSION:
      raise PolicyError(f'example ledger state must be a mapping with privacy_unit example and '
                        f'schema_version {SCHEMA_VERSION}. Found {state!r:.200}.')
    if not isinstance(policy, PrivacyPolicy) or state.get('policy') != policy.to_json_dict():
      raise PolicyError('example ledger state must have been saved under the same policy.')
    saved_accountant = accounting.as_accountant(state.get('accountant'))
    if accountant is not None and accounting.as_accountant(accountant) is not saved_accountant:
      raise PolicyError(f'example ledger state accountant must be '
                        f'{accounting.as_accountant(accountant).value}. '
                        f'Found {saved_accountant.value}.')
    raw_sites = state.get('sites')
    if not isinstance(raw_sites, Mapping):
      raise PolicyError(f'example ledger state sites must be a mapping. Found {raw_sites!r}.')
    saved_specs = {
        site_id: SiteSpec(SamplingSpec.from_json_dict(raw.get('sampling')),
                          raw.get('planned_noise_multipliers'))
        for site_id, raw in raw_sites.items()}
    if sites is not None and dict(sites) != saved_specs:
      raise PolicyError('example ledger state must match the resumed run\'s sites (examples, '
                        'batch size, planned multipliers).')
    ledger = cls(policy, saved_specs, state.get('local_steps'), saved_accountant,
                 SamplingSpec.from_json_dict(state.get('site_sampling')))
    for site_id, raw in raw_sites.items():
      site = ledger._sites[site_id]
      for entry in raw.get('history', []):
        zs = entry['noise_multipliers']
        site.history.append([
            tuple(None if zs[c] is None else (accounting.positive('noise_multiplier', zs[c]),)
                  for c in categories.CATEGORY_IDS),
            accounting.positive_int('steps', entry['steps']),
            accounting.positive_int('rounds', entry['rounds'])])
    rounds = state.get('rounds_completed')
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < max(
        s.rounds for s in ledger._sites.values()):
      raise PolicyError(f'example ledger state rounds_completed must be an integer at least '
                        f'every site\'s rounds. Found {rounds!r}.')
    ledger._rounds = rounds
    for site_id, raw in raw_sites.items():
      site = ledger._sites[site_id]
      site.restore_frozen(raw.get('frozen', {}), rounds, 'example ledger state')
      over = site.over_budget()
      if over:
        raise PolicyError(f'example ledger state must keep {over[0]} within its budget at site '
                          f'{site_id}. Found epsilon {over[1]:.6g}.')
    for site_id in ledger._sites:
      ledger._update_frozen(site_id)
    return ledger


validate_example_ledger_json = schema.validate_example_ledger_json
