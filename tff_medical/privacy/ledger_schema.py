"""The published privacy ledgers' JSON shape (privacy_ledger.json), client- and example-level,
and the checks that a ledger read or written is honest.
"""

import json
import math
import os
from typing import Any, Mapping, Sequence

from tff_medical import categories
from tff_medical import fileio
from tff_medical.privacy import accounting
from tff_medical.privacy.accounting import Accountant
from tff_medical.privacy.accounting import Relation
from tff_medical.privacy.budget import CategoryStatus
from tff_medical.privacy.policy import PrivacyLevel
from tff_medical.privacy.sampling import SamplingMethod
from tff_medical.privacy.shared_noise_calibration import NoiseMechanism
from tff_medical.errors import PolicyError

LEDGER_FILENAME = 'privacy_ledger.json'
SAMPLING_KEYS = ('method', 'total_clients', 'expected_clients_per_round', 'rate')
TOLERANCE = 1e-9
# 2: both neighbouring relations per category, earlier runs on the same data (1 still read).
CLIENT_SCHEMA_VERSION = 2
EXAMPLE_SCHEMA_VERSION = 1
EXAMPLE_PRIVACY_UNIT = 'example'
WHOLE_GUARANTEE = 'worst_site'
EXAMPLE_STATEMENT = (
    'Per category c, everything released is (epsilon_c, delta)-DP with respect to adding or '
    'removing one category-c image at one site (the privacy unit is one image). The guarantee is '
    'the worst site\'s: each example is held and used by one site only, and the other sites\' '
    'updates do not depend on it. The top-level figures are the largest over the sites. Each '
    'site\'s example count n sets its sampling rate b / n and is published here: n is treated as '
    'public.')
CATEGORY_KEYS_V1 = ('display_name', 'privacy_level', 'target_epsilon', 'noise_multiplier',
                    'rounds_released', 'epsilon_spent', 'status')


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value))


def check_keys(where: str, value: Any, keys: Sequence[str], problems: list[str],
               optional: Sequence[str] = ()) -> bool:
  """False, with a problem appended, unless `value` is an object with exactly `keys`."""
  if not isinstance(value, Mapping):
    problems.append(f'{where} must be an object. Found {value!r}.')
    return False
  missing = [k for k in keys if k not in value]
  extra = sorted(str(k) for k in value if k not in keys and k not in optional)
  if missing or extra:
    problems.append(f'{where} must have exactly the keys {", ".join(keys)}. Found missing '
                    f'{missing} and unexpected {extra}.')
    return False
  return True


def _check_delta_and_rounds(ledger: Mapping[str, Any], problems: list[str]):
  """Checks delta and rounds_completed; returns rounds_completed, None if it is not valid."""
  delta = ledger['delta']
  if not is_number(delta) or not 0 < delta < 1:
    problems.append(f'delta must be a number in (0, 1). Found {delta!r}.')
  rounds = ledger['rounds_completed']
  if not is_int(rounds) or rounds < 0:
    problems.append(f'rounds_completed must be a non-negative integer. Found {rounds!r}.')
    return None
  return rounds


def _check_accountant(ledger: Mapping[str, Any], problems: list[str]) -> None:
  if ledger['accountant'] not in [a.value for a in Accountant]:
    problems.append(f'accountant must be one of rdp, pld. Found {ledger["accountant"]!r}.')


def _check_names(where: str, entry: Mapping[str, Any], problems: list[str]) -> None:
  """A category's display name and privacy level."""
  if not isinstance(entry['display_name'], str) or not entry['display_name'].strip():
    problems.append(f'{where}.display_name must be a non-empty string. '
                    f'Found {entry["display_name"]!r}.')
  if entry['privacy_level'] not in [level.value for level in PrivacyLevel]:
    problems.append(f'{where}.privacy_level must be one of High, Medium, Low. '
                    f'Found {entry["privacy_level"]!r}.')


def _check_settings(where: str, entry: Mapping[str, Any], problems: list[str]) -> None:
  """A category's status, target and multiplier."""
  if entry['status'] not in [s.value for s in CategoryStatus]:
    problems.append(f'{where}.status must be active or exhausted. Found {entry["status"]!r}.')
  for key in ('target_epsilon', 'noise_multiplier'):
    if not is_number(entry[key]) or entry[key] <= 0:
      problems.append(f'{where}.{key} must be a positive number. Found {entry[key]!r}.')


def write_ledger(run_dir: str, payload: Mapping[str, Any]) -> str:
  """Checks a ledger and writes it as run_dir/privacy_ledger.json atomically; returns its path."""
  validate_ledger_json(payload)
  # A reader (the dashboard) sees the old file or the new one, never half of one.
  return fileio.write_atomic(os.path.join(run_dir, LEDGER_FILENAME),
                             json.dumps(payload, indent=2, allow_nan=False) + '\n')


RELATION_NAMES = {
    SamplingMethod.POISSON: 'add_or_remove_one',
    SamplingMethod.FIXED_SIZE: 'replace_one',
}

# What each guarantee is about, as the ledger and the model card state it (README "What is
# private, and from whom"). Fixed-size sampling is accounted under replace-one.
RELATION_STATEMENTS = {
    SamplingMethod.POISSON: {
        Relation.REMOVE_CATEGORY_EXAMPLES.value:
            'adding or removing all of one client\'s category-c examples; the client stays',
        Relation.REMOVE_WHOLE_CLIENT.value:
            'adding or removing one whole client whose only examples are category c',
        'client_level': 'adding or removing one whole client, whatever its categories',
    },
    SamplingMethod.FIXED_SIZE: {
        Relation.REMOVE_CATEGORY_EXAMPLES.value:
            'replacing one client\'s category-c examples by others; the client stays',
        Relation.REMOVE_WHOLE_CLIENT.value:
            'replacing one whole client whose only examples are category c by another such client',
        'client_level': 'replacing one whole client by another',
    },
}


# The client-level ledger (privacy_unit client).

_CLIENT_TOP_KEYS_V1 = ('schema_version', 'accountant', 'privacy_unit', 'neighboring_relation', 'delta',
                'sampling', 'rounds_completed', 'client_level_epsilon', 'categories')
_CLIENT_TOP_KEYS = _CLIENT_TOP_KEYS_V1 + ('neighboring_relations', 'earlier_runs')
# Optional top-level keys: absent in ledgers written before they existed.
_OPTIONAL_CLIENT_TOP_KEYS = ('noise_mechanism',)
CATEGORY_KEYS = CATEGORY_KEYS_V1 + ('epsilon_this_run', 'relations')
_RELATION_KEYS = ('epsilon', 'noise_multiplier', 'rounds')


def validate_ledger_json(ledger: Any) -> None:
  """Checks a published ledger's shape and invariants; raises PolicyError listing every problem.

  Beyond types and keys it checks what must hold for an honest ledger: rate = m / N, the
  relation that the sampling is accounted under, no category over its target, rounds released
  within rounds completed, and a client-level epsilon no smaller than any category's.
  A ledger with privacy_unit 'example' is checked by `validate_example_ledger_json`.
  """
  if (isinstance(ledger, Mapping) and ledger.get('privacy_unit') == EXAMPLE_PRIVACY_UNIT and
      'sites' in ledger):
    validate_example_ledger_json(ledger)
    return
  problems: list[str] = []
  version = ledger.get('schema_version') if isinstance(ledger, Mapping) else None
  # Version 1 ledgers (one relation, no earlier runs) stay readable.
  top_keys, category_keys = ((_CLIENT_TOP_KEYS_V1, CATEGORY_KEYS_V1) if version == 1 else
                             (_CLIENT_TOP_KEYS, CATEGORY_KEYS))
  if not check_keys('ledger', ledger, top_keys, problems, _OPTIONAL_CLIENT_TOP_KEYS):
    raise PolicyError(' '.join(problems))
  mechanisms = [m.value for m in NoiseMechanism]
  if 'noise_mechanism' in ledger and ledger['noise_mechanism'] not in mechanisms:
    problems.append(f'noise_mechanism must be one of {", ".join(mechanisms)}. '
                    f'Found {ledger["noise_mechanism"]!r}.')
  if not is_int(ledger['schema_version']) or ledger['schema_version'] not in (1, CLIENT_SCHEMA_VERSION):
    problems.append(f'schema_version must be 1 or {CLIENT_SCHEMA_VERSION}. '
                    f'Found {ledger["schema_version"]!r}.')
  if version == CLIENT_SCHEMA_VERSION:
    if not isinstance(ledger['earlier_runs'], list):
      problems.append(f'earlier_runs must be a list. Found {ledger["earlier_runs"]!r}.')
    statements = ledger['neighboring_relations']
    wanted = RELATION_STATEMENTS.get(_METHOD_BY_VALUE.get(
        ledger['sampling'].get('method') if isinstance(ledger['sampling'], Mapping) else None))
    if wanted is not None and statements != wanted:
      problems.append(f'neighboring_relations must be {wanted!r}. Found {statements!r}.')
  _check_accountant(ledger, problems)
  if ledger['privacy_unit'] != 'client':
    problems.append(f'privacy_unit must be client. Found {ledger["privacy_unit"]!r}.')
  rounds = _check_delta_and_rounds(ledger, problems)

  sampling = ledger['sampling']
  if check_keys('sampling', sampling, SAMPLING_KEYS, problems):
    method = sampling['method']
    if method not in RELATION_NAMES_BY_VALUE:
      problems.append(f'sampling.method must be one of poisson, fixed_size. Found {method!r}.')
    else:
      if ledger['neighboring_relation'] != RELATION_NAMES_BY_VALUE[method]:
        problems.append(f'neighboring_relation must be {RELATION_NAMES_BY_VALUE[method]} for '
                        f'{method} sampling. Found {ledger["neighboring_relation"]!r}.')
      if ledger['accountant'] in [a.value for a in Accountant]:
        problem = accounting.sampling_accountant_problem(method, ledger['accountant'])
        if problem:
          problems.append(problem)
    n, m = sampling['total_clients'], sampling['expected_clients_per_round']
    if not (is_int(n) and is_int(m) and 1 <= m <= n):
      problems.append('sampling.total_clients and expected_clients_per_round must be integers '
                      f'with 1 <= m <= N. Found N={n!r}, m={m!r}.')
    elif not is_number(sampling['rate']) or not math.isclose(
        sampling['rate'], m / n, rel_tol=TOLERANCE):
      problems.append(f'sampling.rate must be expected_clients_per_round / total_clients '
                      f'({m / n!r}). Found {sampling["rate"]!r}.')

  client_epsilon = ledger['client_level_epsilon']
  if not is_number(client_epsilon) or client_epsilon < 0:
    problems.append(f'client_level_epsilon must be a non-negative number. '
                    f'Found {client_epsilon!r}.')
    client_epsilon = None

  entries = ledger['categories']
  if not isinstance(entries, Mapping) or list(entries) != list(categories.CATEGORY_IDS):
    found = list(entries) if isinstance(entries, Mapping) else entries
    problems.append(f'categories must list {", ".join(categories.CATEGORY_IDS)} in that order. '
                    f'Found {found!r}.')
    raise PolicyError(' '.join(problems))
  for c, entry in entries.items():
    where = f'categories.{c}'
    if not check_keys(where, entry, category_keys, problems):
      continue
    if version == CLIENT_SCHEMA_VERSION:
      _check_relations(where, entry, problems)
    _check_names(where, entry, problems)
    _check_settings(where, entry, problems)
    released, spent = entry['rounds_released'], entry['epsilon_spent']
    if not is_int(released) or released < 0 or (rounds is not None and released > rounds):
      problems.append(f'{where}.rounds_released must be an integer in 0..rounds_completed '
                      f'({rounds}). Found {released!r}.')
      released = None
    if not is_number(spent) or spent < 0:
      problems.append(f'{where}.epsilon_spent must be a non-negative number. Found {spent!r}.')
      continue
    if version == CLIENT_SCHEMA_VERSION and ledger['earlier_runs']:
      pass  # Earlier runs on the same data: spend without a round of this run is expected.
    elif released == 0 and spent != 0:
      problems.append(f'{where}.epsilon_spent must be 0 with no round released. Found {spent!r}.')
    if released and spent == 0:
      problems.append(f'{where}.epsilon_spent must be positive after {released} released '
                      'rounds. Found 0.')
    if is_number(entry['target_epsilon']) and spent > entry['target_epsilon']:
      problems.append(f'{where}.epsilon_spent must not exceed target_epsilon '
                      f'({entry["target_epsilon"]!r}). Found {spent!r}.')
    if client_epsilon is not None and client_epsilon < spent * (1 - TOLERANCE):
      problems.append(f'client_level_epsilon must be at least {where}.epsilon_spent ({spent!r}).'
                      f' Found {client_epsilon!r}.')
  if problems:
    raise PolicyError(' '.join(problems))


RELATION_NAMES_BY_VALUE = {method.value: name for method, name in RELATION_NAMES.items()}
_METHOD_BY_VALUE = {method.value: method for method in SamplingMethod}


def _check_relations(where: str, entry: Mapping[str, Any], problems: list[str]) -> None:
  """Both relations present, each within the target, epsilon_spent their larger."""
  relations = entry['relations']
  names = [r.value for r in Relation]
  if not check_keys(f'{where}.relations', relations, names, problems):
    return
  epsilons = []
  for name in names:
    if not check_keys(f'{where}.relations.{name}', relations[name], _RELATION_KEYS, problems):
      return
    value = relations[name]['epsilon']
    rounds = relations[name]['rounds']
    if not is_number(value) or value < 0:
      problems.append(f'{where}.relations.{name}.epsilon must be a non-negative number. '
                      f'Found {value!r}.')
      return
    if not isinstance(rounds, list) or not all(
        isinstance(g, list) and len(g) == 2 and is_number(g[0]) and g[0] > 0 and is_int(g[1]) and
        g[1] > 0 for g in rounds) or (is_int(entry['rounds_released']) and
                                      sum(g[1] for g in rounds) != entry['rounds_released']):
      problems.append(f'{where}.relations.{name}.rounds must be [multiplier, count] pairs '
                      f'counting rounds_released ({entry["rounds_released"]!r}). Found {rounds!r}.')
    if is_number(entry['target_epsilon']) and value > entry['target_epsilon']:
      problems.append(f'{where}.relations.{name}.epsilon must not exceed target_epsilon '
                      f'({entry["target_epsilon"]!r}). Found {value!r}.')
    epsilons.append(value)
  spent = entry['epsilon_spent']
  if is_number(spent) and not math.isclose(spent, max(epsilons), rel_tol=TOLERANCE):
    problems.append(f'{where}.epsilon_spent must be the larger relation\'s epsilon '
                    f'({max(epsilons)!r}). Found {spent!r}.')


# The example-level ledger (privacy_unit example).

_EXAMPLE_TOP_KEYS = ('schema_version', 'accountant', 'privacy_unit', 'neighboring_relation', 'delta',
             'sampling', 'rounds_completed', 'local_steps_per_round', 'whole_guarantee',
             'statement', 'example_level_epsilon', 'client_level_epsilon', 'client_level_ledger',
             'categories', 'sites')
_SITE_KEYS = ('sampling', 'rounds_participated', 'steps_completed', 'categories')
_SITE_CATEGORY_KEYS = ('target_epsilon', 'noise_multiplier', 'rounds_released',
                       'steps_released', 'epsilon_spent', 'status')


def validate_example_ledger_json(ledger: Any) -> None:
  """Checks an example-level ledger's shape and invariants; PolicyError listing every problem.

  Beyond keys and types: each site's rate = b / n, no category over its target at any site,
  steps and rounds released within what the site took, and the top-level figures are the worst
  site's (whole_guarantee 'worst_site'), with example_level_epsilon their largest.
  """
  problems: list[str] = []
  if not check_keys('ledger', ledger, _EXAMPLE_TOP_KEYS, problems):
    raise PolicyError(' '.join(problems))
  if ledger['schema_version'] != EXAMPLE_SCHEMA_VERSION:
    problems.append(f'schema_version must be {EXAMPLE_SCHEMA_VERSION}. '
                    f'Found {ledger["schema_version"]!r}.')
  if ledger['privacy_unit'] != EXAMPLE_PRIVACY_UNIT:
    problems.append(f'privacy_unit must be example. Found {ledger["privacy_unit"]!r}.')
  _check_accountant(ledger, problems)
  if ledger['neighboring_relation'] != 'add_or_remove_one':
    problems.append(f'neighboring_relation must be add_or_remove_one (Poisson example '
                    f'sampling). Found {ledger["neighboring_relation"]!r}.')
  if ledger['whole_guarantee'] != WHOLE_GUARANTEE:
    problems.append(f'whole_guarantee must be {WHOLE_GUARANTEE}. '
                    f'Found {ledger["whole_guarantee"]!r}.')
  if not isinstance(ledger['statement'], str) or not ledger['statement'].strip():
    problems.append('statement must be a non-empty string.')
  rounds = _check_delta_and_rounds(ledger, problems)
  site_sampling = ledger['sampling']
  if check_keys('sampling', site_sampling, SAMPLING_KEYS, problems):
    n, m = site_sampling['total_clients'], site_sampling['expected_clients_per_round']
    if isinstance(ledger['sites'], Mapping) and n != len(ledger['sites']):
      problems.append(f'sampling.total_clients must be the number of sites '
                      f'({len(ledger["sites"])}). Found {n!r}.')
    rate = site_sampling['rate']
    if not (is_int(m) and is_int(n) and 1 <= m <= n) or not (
        is_number(rate) and math.isclose(rate, m / n, rel_tol=TOLERANCE)):
      problems.append(f'sampling must have integers 1 <= m <= N and rate m / N. '
                      f'Found {site_sampling!r}.')
  if not is_int(ledger['local_steps_per_round']) or ledger['local_steps_per_round'] < 1:
    problems.append(f'local_steps_per_round must be a positive integer. '
                    f'Found {ledger["local_steps_per_round"]!r}.')
  client = ledger['client_level_epsilon']
  if client is not None and (not is_number(client) or client < 0):
    problems.append(f'client_level_epsilon must be null or a non-negative number. '
                    f'Found {client!r}.')
  if (client is None) != (ledger['client_level_ledger'] is None):
    problems.append('client_level_epsilon and client_level_ledger must both be set (client-'
                    'level noise stacked) or both be null. Found '
                    f'{client!r} and {ledger["client_level_ledger"]!r}.')
  sites = ledger['sites']
  if not isinstance(sites, Mapping) or not sites:
    problems.append(f'sites must be a non-empty object. Found {sites!r}.')
    raise PolicyError(' '.join(problems))
  per_category: dict[str, list] = {c: [] for c in categories.CATEGORY_IDS}
  for site_id, site in sites.items():
    where = f'sites.{site_id}'
    if not check_keys(where, site, _SITE_KEYS, problems):
      continue
    sampling = site['sampling']
    if check_keys(f'{where}.sampling', sampling, SAMPLING_KEYS, problems):
      n, b = sampling['total_clients'], sampling['expected_clients_per_round']
      if sampling['method'] != 'poisson':
        problems.append(f'{where}.sampling.method must be poisson. Found {sampling["method"]!r}.')
      if not (is_int(n) and is_int(b) and 1 <= b <= n):
        problems.append(f'{where}.sampling examples and batch must be integers with 1 <= b <= '
                        f'n. Found n={n!r}, b={b!r}.')
      elif not is_number(sampling['rate']) or not math.isclose(sampling['rate'], b / n,
                                                                rel_tol=TOLERANCE):
        problems.append(f'{where}.sampling.rate must be {b / n!r}. Found {sampling["rate"]!r}.')
    site_rounds, steps = site['rounds_participated'], site['steps_completed']
    if not is_int(site_rounds) or site_rounds < 0 or (rounds is not None and
                                                       site_rounds > rounds):
      problems.append(f'{where}.rounds_participated must be in 0..rounds_completed. '
                      f'Found {site_rounds!r}.')
      site_rounds = None
    if not is_int(steps) or steps < 0:
      problems.append(f'{where}.steps_completed must be a non-negative integer. Found {steps!r}.')
      steps = None
    entries = site['categories']
    if not isinstance(entries, Mapping) or list(entries) != list(categories.CATEGORY_IDS):
      problems.append(f'{where}.categories must list the six categories in order.')
      continue
    for c, entry in entries.items():
      cw = f'{where}.categories.{c}'
      if not check_keys(cw, entry, _SITE_CATEGORY_KEYS, problems):
        continue
      per_category[c].append(entry)
      _check_settings(cw, entry, problems)
      released, steps_released = entry['rounds_released'], entry['steps_released']
      if not is_int(released) or released < 0 or (site_rounds is not None and
                                                   released > site_rounds):
        problems.append(f'{cw}.rounds_released must be in 0..rounds_participated. '
                        f'Found {released!r}.')
      if not is_int(steps_released) or steps_released < 0 or (steps is not None and
                                                               steps_released > steps):
        problems.append(f'{cw}.steps_released must be in 0..steps_completed. '
                        f'Found {steps_released!r}.')
      spent = entry['epsilon_spent']
      if not is_number(spent) or spent < 0:
        problems.append(f'{cw}.epsilon_spent must be a non-negative number. Found {spent!r}.')
        continue
      if (steps_released == 0) != (spent == 0):
        problems.append(f'{cw}.epsilon_spent must be 0 exactly when no step was released. '
                        f'Found {spent!r} after {steps_released!r} steps.')
      if is_number(entry['target_epsilon']) and spent > entry['target_epsilon']:
        problems.append(f'{cw}.epsilon_spent must not exceed target_epsilon '
                        f'({entry["target_epsilon"]!r}). Found {spent!r}.')

  whole = ledger['categories']
  if not isinstance(whole, Mapping) or list(whole) != list(categories.CATEGORY_IDS):
    problems.append(f'categories must list {", ".join(categories.CATEGORY_IDS)} in that order.')
    raise PolicyError(' '.join(problems))
  largest = 0.0
  for c, entry in whole.items():
    where = f'categories.{c}'
    if not check_keys(where, entry, CATEGORY_KEYS_V1, problems):
      continue
    _check_names(where, entry, problems)
    spent = entry['epsilon_spent']
    site_entries = [e for e in per_category[c] if is_number(e.get('epsilon_spent'))]
    if not is_number(spent):
      problems.append(f'{where}.epsilon_spent must be a number. Found {spent!r}.')
      continue
    largest = max(largest, spent)
    if site_entries:
      worst = max(e['epsilon_spent'] for e in site_entries)
      if not math.isclose(spent, worst, rel_tol=TOLERANCE, abs_tol=1e-15):
        problems.append(f'{where}.epsilon_spent must be the worst site\'s ({worst!r}). '
                        f'Found {spent!r}.')
      all_exhausted = all(e.get('status') == 'exhausted' for e in site_entries)
      if entry['status'] != ('exhausted' if all_exhausted else 'active'):
        problems.append(f'{where}.status must be exhausted exactly when every site has it '
                        f'exhausted. Found {entry["status"]!r}.')
    if is_number(entry['target_epsilon']) and spent > entry['target_epsilon']:
      problems.append(f'{where}.epsilon_spent must not exceed target_epsilon. Found {spent!r}.')
  example = ledger['example_level_epsilon']
  if not is_number(example) or not math.isclose(example, largest, rel_tol=TOLERANCE,
                                                 abs_tol=1e-15):
    problems.append(f'example_level_epsilon must be the largest category figure ({largest!r}). '
                    f'Found {example!r}.')
  if problems:
    raise PolicyError(' '.join(problems))
