"""The privacy policy: each category's budget, as data, validated into typed objects."""

import dataclasses
import enum
import json
import math
import os
from typing import Any, Mapping

from tff_medical import categories
from tff_medical.errors import PolicyError

DEFAULT_POLICY_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    'configs', 'privacy_policy.json')

# The largest delta a policy may set. An (epsilon, delta) guarantee still holds for a mechanism
# that publishes one whole client's data with probability delta, so it means something only when
# delta is well below 1/number of clients (Dwork & Roth 2014, section 2.3). A policy is written
# before the number of clients is known, so this is a fixed ceiling rather than 1/n: it refuses
# typos like 0.99 or 0.1 (0.99 let round 1 train, then every rerun failed), keeps delta < 1/n for
# up to 1000 clients, and leaves the usual 1e-5 to 1e-7 far inside.
MAX_DELTA = 1e-3
# A policy is a few hundred bytes; a larger file is not one (and is not read whole).
_MAX_POLICY_BYTES = 1 << 20


class PrivacyLevel(enum.Enum):
  HIGH = 'High'
  MEDIUM = 'Medium'
  LOW = 'Low'


@dataclasses.dataclass(frozen=True)
class CategoryBudget:
  """One category's client-level budget (epsilon at the policy's delta)."""

  id: str
  display_name: str
  privacy_level: PrivacyLevel
  epsilon: float
  noise_level: str


@dataclasses.dataclass(frozen=True)
class PrivacyPolicy:
  """Budgets for all six categories, in label order, and the shared delta."""

  delta: float
  budgets: tuple[CategoryBudget, ...]

  def budget(self, category_id: str) -> CategoryBudget:
    for budget in self.budgets:
      if budget.id == category_id:
        return budget
    raise PolicyError(f'category must be one of {", ".join(categories.CATEGORY_IDS)}. '
                      f'Found {category_id!r}.')

  @property
  def epsilons(self) -> tuple[float, ...]:
    return tuple(b.epsilon for b in self.budgets)

  def scaled(self, factor: float) -> 'PrivacyPolicy':
    """The same policy with every epsilon multiplied by `factor` (for privacy-utility studies)."""
    factor = _positive_number('scale factor', factor)
    return dataclasses.replace(
        self,
        budgets=tuple(dataclasses.replace(b, epsilon=b.epsilon * factor) for b in self.budgets))

  def to_json_dict(self) -> dict[str, Any]:
    return {
        'delta': self.delta,
        'categories': [
            dict(dataclasses.asdict(b), privacy_level=b.privacy_level.value) for b in self.budgets
        ],
    }


def _positive_number(field: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise PolicyError(f'{field} must be a positive number. Found {value!r}.')
  if not math.isfinite(value) or value <= 0:
    raise PolicyError(f'{field} must be a positive number. Found {value!r}.')
  return float(value)


def _text(field: str, value: Any) -> str:
  if not isinstance(value, str) or not value.strip():
    raise PolicyError(f'{field} must be a non-empty string. Found {value!r}.')
  return value


def policy_from_dict(raw: Mapping[str, Any]) -> PrivacyPolicy:
  """Validates a policy mapping; raises PolicyError naming the field and value."""
  if not isinstance(raw, Mapping):
    raise PolicyError(f'policy must be a JSON object. Found {type(raw).__name__}.')
  delta = raw.get('delta')
  if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta <= MAX_DELTA:
    raise PolicyError(f'delta must be a number in (0, {MAX_DELTA:g}] (well below 1/number of '
                      f'clients). Found {delta!r}.')
  entries = raw.get('categories')
  if not isinstance(entries, list):
    raise PolicyError(f'categories must be a list of category entries. Found {entries!r}.')
  by_id: dict[str, CategoryBudget] = {}
  for entry in entries:
    if not isinstance(entry, Mapping):
      raise PolicyError(f'each category entry must be an object. Found {entry!r}.')
    category_id = entry.get('id')
    if category_id not in categories.CATEGORY_IDS:
      raise PolicyError(f'categories[].id must be one of {", ".join(categories.CATEGORY_IDS)}. '
                        f'Found {category_id!r}.')
    if category_id in by_id:
      raise PolicyError(f'categories[].id must be unique. Found {category_id!r} twice.')
    level = entry.get('privacy_level')
    try:
      privacy_level = PrivacyLevel(level)
    except ValueError:
      raise PolicyError(
          f'{category_id}.privacy_level must be one of '
          f'{", ".join(l.value for l in PrivacyLevel)}. Found {level!r}.') from None
    by_id[category_id] = CategoryBudget(
        id=category_id,
        display_name=_text(f'{category_id}.display_name',
                           entry.get('display_name', categories.DISPLAY_NAMES[category_id])),
        privacy_level=privacy_level,
        epsilon=_positive_number(f'{category_id}.epsilon', entry.get('epsilon')),
        noise_level=_text(f'{category_id}.noise_level', entry.get('noise_level')),
    )
  missing = [c for c in categories.CATEGORY_IDS if c not in by_id]
  if missing:
    raise PolicyError(f'categories must list all six categories. Found none for {", ".join(missing)}.')
  return PrivacyPolicy(
      delta=float(delta), budgets=tuple(by_id[c] for c in categories.CATEGORY_IDS))


def load_policy(path: str = DEFAULT_POLICY_PATH) -> PrivacyPolicy:
  """Reads and validates a policy file (UTF-8 JSON); raises PolicyError for any unusable file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise PolicyError(f'policy file must exist. Found no file at {path}.')
  if not os.path.isfile(path):
    # Never opened: a folder fails to open, a FIFO would block.
    raise PolicyError(f'policy file must be a regular file. Found {path}, which is not '
                      '(a folder?).')
  try:
    with open(path, 'rb') as f:
      data = f.read(_MAX_POLICY_BYTES + 1)
  except OSError as e:
    raise PolicyError(f'policy file must be readable. Found {path}: {e.strerror}.') from None
  if len(data) > _MAX_POLICY_BYTES:
    raise PolicyError(f'policy file must be at most {_MAX_POLICY_BYTES} bytes. Found a larger '
                      f'file at {path}.')
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise PolicyError(f'policy file must be UTF-8 JSON. Found a byte that is not UTF-8 at '
                      f'offset {e.start} of {path}.') from None
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise PolicyError(f'policy file must be valid JSON. Found an error in {path}: {e}.') from None
  except RecursionError:
    raise PolicyError(f'policy file must be valid JSON. Found nesting too deep in {path}.') from None
  return policy_from_dict(raw)


def default_policy() -> PrivacyPolicy:
  return load_policy(DEFAULT_POLICY_PATH)
