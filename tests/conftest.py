"""Test-suite wiring: every TFF computation runs on the confined worker, which ends with pytest."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def tff_context():
  """Installs the loopback-only TFF context for tests that run federated computations."""
  from tff_medical import runtime  # pylint: disable=g-import-not-at-top

  worker = runtime.install_execution_context()
  yield worker
  runtime.shutdown()


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  from tff_medical import runtime  # pylint: disable=g-import-not-at-top

  runtime.shutdown()
