"""Errors for bad input. All derive from ValueError so callers can catch a user's mistake."""


class TffMedicalError(ValueError):
  """Base class: a user's mistake or bad input, reported without a traceback."""


class PolicyError(TffMedicalError):
  """An invalid privacy policy or privacy setting."""


class DataError(TffMedicalError):
  """A data source with no usable image, or an unusable argument to a loader."""


class ConfigError(TffMedicalError):
  """An invalid or contradictory experiment configuration."""


class RuntimeIsolationError(RuntimeError):
  """TFF's worker could not be started in the required isolation (loopback only)."""


def parse_enum(enum_type, value, field: str, error_type=TffMedicalError):
  """`value` as a member of `enum_type` (a member or its value); else `error_type` naming the
  choices, in the one message format: "field must be one of a, b. Found 'c'."."""
  if isinstance(value, enum_type):
    return value
  try:
    return enum_type(value)
  except ValueError:
    raise error_type(f'{field} must be one of {", ".join(str(m.value) for m in enum_type)}. '
                     f'Found {value!r}.') from None
