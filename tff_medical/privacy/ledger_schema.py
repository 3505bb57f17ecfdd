"""JSON-shape pieces shared by the client-level and example-level privacy ledgers."""
import math
from typing import Any, Mapping, Sequence

LEDGER_FILENAME = 'privacy_ledger.json'
SAMPLING_KEYS = ('method', 'total_clients', 'expected_clients_per_round', 'rate')
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

