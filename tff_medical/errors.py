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
