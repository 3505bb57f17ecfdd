"""Test-suite wiring: every TFF computation runs on the confined worker, which ends with pytest."""

import os
import shutil

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session', autouse=True)
def audit_key_file(tmp_path_factory):
  """The audit custodian key for the whole session, in a private temporary folder.

  Set in os.environ so that programs the tests start inherit it: no test writes a key or an
  anchor in the real home directory.
  """
  path = tmp_path_factory.mktemp('audit_custodian') / 'keys' / 'audit.key'
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('TFF_MEDICAL_AUDIT_KEY_FILE', str(path))
    yield str(path)


@pytest.fixture(scope='session', autouse=True)
def budget_registry_dir(tmp_path_factory):
  """The dataset budget registry for the whole session, in a private temporary folder.

  Runs on real data (mednist, dicom) record their spend there; none writes in the real home.
  """
  path = tmp_path_factory.mktemp('budget_registry') / 'registry'
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('TFF_MEDICAL_BUDGET_REGISTRY', str(path))
    yield str(path)


@pytest.fixture(scope='session')
def tff_context():
  """Installs the loopback-only TFF context for tests that run federated computations."""
  from tff_medical import runtime  # pylint: disable=g-import-not-at-top

  worker = runtime.install_execution_context()
  yield worker
  runtime.shutdown()


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory, tff_context):
  """helpers.smoke_config()'s 4 rounds, trained once a session for the modules that inspect it.

  Returns (result, pristine): the RunResult, whose run_dir test_program inspects and resumes in
  place (its audit anchor belongs to that path), and a copy taken before any test touched it,
  for tests that copy a finished run and damage their copy.
  """
  del tff_context
  from tff_medical.training import program  # pylint: disable=g-import-not-at-top

  from helpers import smoke_config  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('smoke_run')
  result = program.run(smoke_config(), str(root / 'finished'))
  pristine = str(root / 'pristine')
  shutil.copytree(result.run_dir, pristine)
  return result, pristine


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  from tff_medical import runtime  # pylint: disable=g-import-not-at-top

  runtime.shutdown()
