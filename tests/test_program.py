"""The training program: resume, refusal of incompatible resumes, budget exhaustion, outputs."""

import csv
import json
import os

import numpy as np
import pytest

from tff_medical import categories
from tff_medical.errors import ConfigError
from tff_medical.monitoring import audit as audit_lib
from tff_medical.privacy import accounting
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import sampling as sampling_lib
from tff_medical.training import config as config_lib
from tff_medical.training import program

from helpers import REPO  # pylint: disable=g-bad-import-order
from helpers import smoke_config  # pylint: disable=g-bad-import-order


def _metric_rounds(run_dir):
  with open(os.path.join(run_dir, program.METRICS_FILE)) as f:
    return [int(row['round']) for row in csv.DictReader(f)]


def _ledger_json(run_dir):
  with open(os.path.join(run_dir, 'privacy_ledger.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def uninterrupted(smoke_run):
  return smoke_run[0]


@pytest.mark.usefixtures('tff_context')
class TestProgram:

  def test_run_directory_holds_every_output(self, uninterrupted):
    run_dir = uninterrupted.run_dir
    for name in ('config.json', 'metrics.csv', 'audit_log.jsonl', 'privacy_ledger.json',
                 'partition_manifest.json', 'tensorboard', 'checkpoints'):
      assert os.path.exists(os.path.join(run_dir, name)), name
    assert uninterrupted.rounds_completed == 4
    ledger_lib.validate_ledger_json(_ledger_json(run_dir))
    assert _metric_rounds(run_dir) == [1, 2, 3, 4]
    verified = audit_lib.verify_chain(os.path.join(run_dir, 'audit_log.jsonl'))
    assert verified.ok and verified.records == 4, verified

  def test_ledger_matches_independent_accounting_and_budget(self, uninterrupted):
    """epsilon_spent is dp_accounting's figure for the rounds released at the planned z."""
    ledger = _ledger_json(uninterrupted.run_dir)
    spec = sampling_lib.SamplingSpec('poisson', ledger['sampling']['total_clients'],
                                     ledger['sampling']['expected_clients_per_round'])
    for category_id, entry in ledger['categories'].items():
      assert entry['epsilon_spent'] <= entry['target_epsilon'] + 1e-9
      by_relation = {
          relation: accounting.epsilon(
              [(accounting.round_event(figures['noise_multiplier'], spec),
                entry['rounds_released'])], ledger['delta'], 'rdp')
          for relation, figures in entry['relations'].items()}
      # TFF records float32 multipliers; composing its two events differs from one Gaussian at
      # the effective z in the seventh digit.
      for relation, expected in by_relation.items():
        assert entry['relations'][relation]['epsilon'] == pytest.approx(expected, rel=1e-6)
      assert entry['epsilon_spent'] == pytest.approx(max(by_relation.values()), rel=1e-6), \
          category_id

  def test_audit_records_name_pseudonymous_participants(self, uninterrupted):
    log = audit_lib.AuditLog(os.path.join(uninterrupted.run_dir, 'audit_log.jsonl'))
    for record in log.records():
      assert record['num_participants'] == len(record['participants'])
      assert all(p.startswith('client_') for p in record['participants'])
      assert set(record['epsilon_spent']) == set(categories.CATEGORY_IDS)

  @pytest.mark.slow  # End-to-end tier: a run stopped, resumed and compared with the whole one.
  def test_resume_continues_the_ledger_exactly(self, uninterrupted, tmp_path):
    run_dir = str(tmp_path / 'resumed')
    first = program.run(smoke_config(), run_dir, stop_after_rounds=2)
    assert first.rounds_completed == 2 and first.stop_reason == 'stopped'
    assert _metric_rounds(run_dir) == [1, 2]
    second = program.run(smoke_config(), run_dir)
    assert second.rounds_completed == 4
    assert _metric_rounds(run_dir) == [1, 2, 3, 4]
    whole, resumed = _ledger_json(uninterrupted.run_dir), _ledger_json(run_dir)
    assert resumed['rounds_completed'] == whole['rounds_completed'] == 4
    assert resumed['client_level_epsilon'] == pytest.approx(whole['client_level_epsilon'])
    for c in categories.CATEGORY_IDS:
      for field in ('rounds_released', 'epsilon_spent', 'noise_multiplier', 'status'):
        assert resumed['categories'][c][field] == pytest.approx(whole['categories'][c][field])
    verified = audit_lib.verify_chain(os.path.join(run_dir, 'audit_log.jsonl'))
    assert verified.ok and verified.records == 4, verified
    # Another run of the same config draws other clients: the sample comes from a secret, not
    # from config.seed (which config.json publishes to the custodian's readers).
    whole_log = audit_lib.AuditLog(os.path.join(uninterrupted.run_dir, 'audit_log.jsonl'))
    resumed_log = audit_lib.AuditLog(os.path.join(run_dir, 'audit_log.jsonl'))
    assert [r['participants'] for r in whole_log.records()] != [
        r['participants'] for r in resumed_log.records()]

  @pytest.mark.slow  # End-to-end tier: a crash-and-resume sequence of three runs.
  def test_resume_replays_the_secret_sample_and_the_secret_stays_in_checkpoints(
      self, tmp_path, monkeypatch):
    secret = 0x5EC12E7_0F_5A3F1E_5EED_D0E5_0123456789ABCDEF
    monkeypatch.setattr(sampling_lib, 'new_secret', lambda: secret)
    reference = str(tmp_path / 'reference')
    program.run(smoke_config(), reference, stop_after_rounds=3)
    # Another run directory stops after one round and is resumed (a kill -9 resumes the same
    # way: from the checkpoint); new_secret would now give another value, but must not be used.
    monkeypatch.setattr(sampling_lib, 'new_secret', lambda: secret + 1)
    run_dir = str(tmp_path / 'interrupted')
    monkeypatch.setattr(sampling_lib, 'new_secret', lambda: secret)
    program.run(smoke_config(), run_dir, stop_after_rounds=1)
    monkeypatch.setattr(sampling_lib, 'new_secret', lambda: secret + 1)
    program.run(smoke_config(), run_dir, stop_after_rounds=2)
    participants = [[r['participants'] for r in audit_lib.AuditLog(
        os.path.join(d, 'audit_log.jsonl')).records()] for d in (reference, run_dir)]
    assert participants[0] == participants[1] and len(participants[0]) == 3
    # The secret is in the checkpoints (owner-only) and nowhere else in the run directory.
    # As text, and as numpy's UTF-32 string arrays (the checkpoint .npz keeps the sampler's JSON).
    forms = [text.encode(codec) for text in (str(secret), f'{secret:x}', f'{secret:X}')
             for codec in ('ascii', 'utf-32-le')]
    found = {}
    for root, _, files in os.walk(run_dir):
      for name in files:
        path = os.path.join(root, name)
        with open(path, 'rb') as f:
          data = f.read()
        if any(form in data for form in forms):
          found[os.path.relpath(path, run_dir)] = os.stat(path).st_mode & 0o777
    assert found and all(p.startswith('checkpoints' + os.sep) for p in found), found
    assert set(found.values()) == {0o600}

  def test_custodian_dashboard_is_owner_only_even_when_built_outside_a_run(self, uninterrupted,
                                                                          tmp_path):
    from tff_medical.monitoring import dashboard  # pylint: disable=g-import-not-at-top
    old_mask = os.umask(0o022)
    try:
      page = dashboard.build_dashboard([uninterrupted.run_dir], str(tmp_path / 'page.html'))
      public = dashboard.build_dashboard([uninterrupted.run_dir], str(tmp_path / 'public.html'),
                                         public=True)
    finally:
      os.umask(old_mask)
    assert os.stat(page).st_mode & 0o777 == 0o600
    assert os.stat(public).st_mode & 0o777 == 0o644

  def test_run_directory_is_owner_only(self, uninterrupted):
    modes = {}
    for root, dirs, files in os.walk(uninterrupted.run_dir):
      for name in dirs + files:
        path = os.path.join(root, name)
        modes[os.path.relpath(path, uninterrupted.run_dir)] = os.stat(path).st_mode & 0o077
    assert modes and not any(modes.values()), {p: oct(m) for p, m in modes.items() if m}

  @pytest.mark.slow  # End-to-end tier: a crash-and-resume sequence of three runs.
  def test_lost_release_after_checkpoint_is_redone_once(self, tmp_path):
    """A kill between the checkpoint and the audit append: resume writes the record once."""
    run_dir = str(tmp_path / 'lost')
    program.run(smoke_config(), run_dir, stop_after_rounds=1)
    path = os.path.join(run_dir, 'audit_log.jsonl')
    # The keyed log's anchor moves with each append; a real kill before round 2's append leaves
    # it at round 1, so the torn round-2 record below is restored with the anchor of round 1.
    anchor = audit_lib.anchor_path(audit_lib.load_key(), path)
    with open(anchor, 'rb') as f:
      anchor_after_round_1 = f.read()
    program.run(smoke_config(), run_dir, stop_after_rounds=1)
    with open(path) as f:
      lines = f.readlines()
    with open(path, 'w') as f:
      f.writelines(lines[:1])
      f.write(lines[1][:25])  # Torn write of round 2's record.
    with open(anchor, 'wb') as f:
      f.write(anchor_after_round_1)
    program.run(smoke_config(), run_dir, stop_after_rounds=1)
    verified = audit_lib.verify_chain(path)
    assert verified.ok and verified.records == 3, verified
    assert [r['round'] for r in audit_lib.AuditLog(path).records()] == [1, 2, 3]

  @pytest.mark.parametrize('override, section', [
      ({'policy': 'SCALED'}, 'policy'),
      ({'clients_per_round': 12}, 'sampling'),
      ({'num_per_category': 41}, 'dataset'),
      ({'phantom_difficulty': 0.5}, 'dataset'),
      ({'partition': 'dirichlet'}, 'partition'),
  ])
  def test_incompatible_resume_is_refused(self, uninterrupted, tmp_path, override, section):
    if override.get('policy') == 'SCALED':
      with open(os.path.join(REPO, 'configs', 'privacy_policy.json')) as f:
        raw = json.load(f)
      raw['categories'][0]['epsilon'] = 0.75
      path = tmp_path / 'policy.json'
      path.write_text(json.dumps(raw))
      override = {'policy': str(path)}
    with pytest.raises(ConfigError, match=f'Cannot resume .*its [a-z, ]*{section}'):
      program.run(smoke_config(**override), uninterrupted.run_dir)

  @pytest.mark.parametrize('override', [{'model.conv_filters': (6,)},
                                        {'dp_mechanism': 'shared_noise'}])
  def test_resume_with_another_state_shape_is_refused_not_restarted(self, uninterrupted,
                                                                   override):
    before = sorted(os.listdir(os.path.join(uninterrupted.run_dir, 'checkpoints')))
    # A model of another shape is caught by the fingerprint; another aggregator state, on load.
    with pytest.raises(ConfigError,
                       match='Cannot resume the run in .*(model differs|none of its)'):
      program.run(smoke_config(**override), uninterrupted.run_dir)
    assert sorted(os.listdir(os.path.join(uninterrupted.run_dir, 'checkpoints'))) == before

  def test_exhausted_run_says_so_instead_of_training(self, uninterrupted):
    before = _metric_rounds(uninterrupted.run_dir)
    result = program.run(smoke_config(total_rounds=8), uninterrupted.run_dir)
    assert result.stop_reason == 'budget_exhausted'
    assert result.rounds_completed == 4
    assert _metric_rounds(uninterrupted.run_dir) == before

  def test_non_private_run_has_no_ledger_and_releases_train_metrics(self, tmp_path):
    result = program.run(smoke_config(dp=False, total_rounds=2, eval_every=2),
                         str(tmp_path / 'nodp'))
    assert result.ledger is None
    assert not os.path.exists(os.path.join(result.run_dir, 'privacy_ledger.json'))
    with open(os.path.join(result.run_dir, program.METRICS_FILE)) as f:
      row = next(csv.DictReader(f))
    assert 0.0 <= float(row['train/accuracy']) <= 1.0
    assert np.isfinite(result.evaluation['accuracy'])


@pytest.mark.parametrize('override, message', [
    ({'dataset': 'mri'}, 'dataset must be one of'),
    ({'dataset': 'mednist'}, "data_dir must be set for dataset 'mednist'"),
    ({'clients_per_round': 500}, 'clients_per_round must be at most num_clients'),
    ({'sampling': 'fixed_size', 'accountant': 'pld'}, "accountant must be 'rdp'"),
    ({'partition': 'dirichlet', 'dirichlet_alpha': 0.0}, 'dirichlet_alpha must be positive'),
    ({'total_rounds': 0}, 'total_rounds must be a positive integer'),
    ({'client.learning_rate': -1.0}, 'client.learning_rate must be positive'),
    ({'phantom_difficulty': 1.5}, r'phantom_difficulty must be in \[0, 1\]'),
    ({'model.head': 'dense'}, 'model.head must be one of gap, flatten'),
    ({'model.input_pooling': 3}, 'model.input_pooling must be 1, 2, 4 or 8'),
])
def test_contradictory_or_invalid_config_is_refused(override, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(smoke_config(**override))
