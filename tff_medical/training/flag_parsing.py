"""absl flag parsing for scripts with an ml_collections config flag: a bad --config is one line.

  app.run(main, flags_parser=flag_parsing.parse_flags_with_usage)

absl's own parser turns flag errors into 'FATAL Flags parsing error: ...' and exit status 1. Two
mistakes with a config flag escape it as tracebacks: an override of a field the config does not
have (--config.totl_rounds=3 raises KeyError or AttributeError inside ml_collections' parser) and
a config file that cannot be loaded (ml_collections defers that error until the value is first
read, in main). This parser reports both in absl's format. Imports only absl and ml_collections,
so a usage error costs no TensorFlow start-up.
"""

import os
import sys
import textwrap
from typing import NoReturn, Sequence

from absl import flags
from ml_collections import config_flags
# is_config_flag is documented for outside use but not re-exported by the package.
from ml_collections.config_flags import config_flags as config_flags_lib


def _usage_error(message: str) -> NoReturn:
  # The format and exit status of absl.app.parse_flags_with_usage.
  sys.stderr.write(f'FATAL Flags parsing error: {message}\n'
                   'Pass --helpshort or --helpfull to see help on flags.\n')
  sys.exit(1)


def _config_flag_names() -> list[str]:
  return [name for name in flags.FLAGS if config_flags_lib.is_config_flag(flags.FLAGS[name])]


def _innermost_message(error: BaseException) -> str:
  # ml_collections wraps a KeyError in an AttributeError; the KeyError's text is the quoted key.
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def _unknown_field_message(error: BaseException, argv: Sequence[str]) -> str:
  lines = _innermost_message(error).splitlines() or ['']
  key = lines[0].strip('\'"')
  hint = ' '.join(line.strip() for line in lines[1:])
  overrides = [arg.split('=', 1)[0] for arg in argv[1:]
               if any(arg.startswith(f'--{name}.') for name in _config_flag_names())]
  for override in overrides:
    if key in override.split('.')[1:]:
      return f'{override}: the config has no field {key!r}.' + (f' {hint}' if hint else '')
  # Not a missing key (e.g. a field of a number: --config.total_rounds.x).
  return f'{", ".join(overrides) or "--config"}: {" ".join(lines)}'


def _check_config_loaded(name: str) -> None:
  flag = flags.FLAGS[name]
  if flag.value is None:
    return
  try:
    # A config that failed to load raises its deferred error on any attribute read.
    getattr(flag.value, '_tff_medical_probe', None)
  except OSError:
    path = config_flags.get_config_filename(flag)
    if not os.path.exists(path):
      _usage_error(f'--{name}: no config file at {path}.')
    if os.path.isdir(path):
      _usage_error(f'--{name}: {path} is a folder, not a config file.')
    _usage_error(f'--{name}: cannot load config file {path}.')


def parse_flags_with_usage(argv: Sequence[str]) -> list[str]:
  """Parses `argv` into absl's FLAGS; a usage error is one line and exit status 1."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    _usage_error(message if '\n' not in message else '\n' + textwrap.indent(message, '  '))
  except (AttributeError, KeyError) as e:
    _usage_error(_unknown_field_message(e, argv))
  for name in _config_flag_names():
    _check_config_loaded(name)
  return remaining
