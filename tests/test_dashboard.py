"""The run dashboard: compliance checks on tampered runs, the CLI, the page in headless Chromium.

The fast tests build run directories with the project's own writers (PrivacyLedger.save,
AuditLog.append) on fixed noise multipliers. The browser tests (end-to-end tier) open the
dashboard of a small real training run from file:// in Debian's Chromium, with every network
path closed, driven by tests/browser.py.
"""

import ast
import csv
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest

from tff_medical import categories
from tff_medical.monitoring import audit as audit_lib
from tff_medical.monitoring import dashboard
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling as sampling_lib

from browser import Browser  # pylint: disable=g-bad-import-order
from helpers import page_data  # pylint: disable=g-bad-import-order
from helpers import smoke_config  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, 'experiments', 'dashboard.py')
INSTALL_BROWSER = os.path.join(REPO, 'tests', 'install_browser.sh')
CHROMIUM = os.environ.get('CHROMIUM', '/usr/bin/chromium')
# The README's picture; refreshed only on request so that a test run leaves the tree clean.
README_SCREENSHOT = os.path.join(REPO, 'docs', 'dashboard.png')
UPDATE_SCREENSHOT = os.environ.get('TFF_MEDICAL_UPDATE_SCREENSHOT') == '1'
CATS = list(categories.CATEGORY_IDS)
CHART_PANELS = ('accuracy', 'loss', 'epsilon', 'share', 'clip_norm', 'update_norm', 'clients',
                'participation')

# Multipliers that keep 3 rounds of q = 0.1 within the default policy's budgets.
_Z = {'HeadCT': 2.5, 'BreastMRI': 2.5, 'AbdomenCT': 1.75, 'ChestCT': 1.75, 'CXR': 1.25,
      'Hand': 1.25}
_NUM_CLIENTS = 100


def write_synthetic_run(run_dir, rounds=3):
  """A run directory as the training program writes it, without training."""
  os.makedirs(run_dir, exist_ok=True)
  spec = sampling_lib.SamplingSpec('poisson', _NUM_CLIENTS, 10)
  ledger = ledger_lib.PrivacyLedger(policy_lib.default_policy(), _Z, spec, 'rdp')
  log = audit_lib.AuditLog(os.path.join(run_dir, audit_lib.AUDIT_LOG_FILENAME))
  rng = np.random.default_rng(0)
  rows = []
  for round_num in range(1, rounds + 1):
    released = ledger.releasable()
    ledger.record_round({c: dp_accounting.GaussianDpEvent(_Z[c]) for c in released})
    clients = [f'client_{i:05d}' for i in sorted(rng.choice(_NUM_CLIENTS, 10, replace=False))]
    norms = {c: 0.1 / round_num for c in CATS}
    spent = {c: ledger.epsilon_spent(c) for c in CATS}
    log.append({
        'round': round_num, 'participants': clients, 'num_participants': len(clients),
        'categories_released': list(released), 'clip_norms': norms, 'update_norm': 0.3,
        'epsilon_spent': spent, 'client_level_epsilon': ledger.client_level_epsilon,
        'model_sha256': f'{round_num:064x}'})
    row = {'round': round_num, 'round_seconds': 1.5, 'num_clients': len(clients),
           'update_norm': 0.3, 'client_level_epsilon': ledger.client_level_epsilon}
    for c in CATS:
      row.update({f'epsilon/{c}': spent[c], f'clip_norm/{c}': norms[c],
                  f'released/{c}': int(c in released)})
    if round_num % 2 == 0 or round_num == rounds:
      row['eval/accuracy'] = 0.5
      row['eval/loss'] = 1.2
      for c in CATS:
        row[f'eval/accuracy/{c}'] = 0.5
        row[f'eval/loss/{c}'] = 1.2
      row['eval/confusion_matrix'] = json.dumps(np.eye(6, dtype=int).tolist())
    rows.append(row)
  ledger.save(run_dir)
  columns = sorted({k for row in rows for k in row}, key=lambda k: (k != 'round', k))
  with open(os.path.join(run_dir, dashboard.METRICS_FILE), 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(run_dir, dashboard.CONFIG_FILE), 'w') as f:
    json.dump({'config': {'dp': True, 'policy': '', 'total_rounds': rounds,
                          'num_clients': _NUM_CLIENTS},
               'plan': {'noise_multipliers': _Z, 'splits': None},
               'num_clients': _NUM_CLIENTS, 'sampling': spec.to_json_dict()}, f)
  return run_dir


def _edit_ledger(run_dir, edit):
  path = os.path.join(run_dir, ledger_lib.LEDGER_FILENAME)
  with open(path) as f:
    ledger = json.load(f)
  edit(ledger)
  with open(path, 'w') as f:
    json.dump(ledger, f)


def _checks(run_dir):
  return {c.id: c for c in dashboard.compliance(run_dir)}


@pytest.fixture(scope='module')
def synthetic_template(tmp_path_factory):
  return write_synthetic_run(str(tmp_path_factory.mktemp('synthetic') / 'run'))


@pytest.fixture
def synthetic(synthetic_template, tmp_path):
  return shutil.copytree(synthetic_template, str(tmp_path / 'run'))


class TestCompliance:

  def test_an_honest_run_is_green_on_every_item(self, synthetic):
    checks = _checks(synthetic)
    assert list(checks) == [dashboard.BUDGET_RESPECTED, dashboard.LEDGER_CONSISTENT,
                            dashboard.AUDIT_CHAIN, dashboard.NO_IDENTIFIERS]
    assert all(c.ok for c in checks.values()), checks
    assert 'client level' in checks[dashboard.LEDGER_CONSISTENT].reason

  def test_recomputed_epsilon_is_the_accountants(self, synthetic):
    with open(os.path.join(synthetic, ledger_lib.LEDGER_FILENAME)) as f:
      ledger = json.load(f)
    for c in CATS:
      # Independent of the ledger's own cached-RDP path: a fresh accountant per category.
      assert dashboard.recompute_category_epsilon(ledger, c) == pytest.approx(
          ledger['categories'][c]['epsilon_spent'], rel=1e-6)

  def test_overspent_ledger_is_red_on_budget_and_consistency(self, synthetic):
    def overspend(ledger):
      ledger['categories']['HeadCT']['epsilon_spent'] = 0.7
    _edit_ledger(synthetic, overspend)
    checks = _checks(synthetic)
    assert not checks[dashboard.BUDGET_RESPECTED].ok
    assert 'HeadCT: spent 0.7 > budget 0.5' in checks[dashboard.BUDGET_RESPECTED].reason
    assert not checks[dashboard.LEDGER_CONSISTENT].ok
    # The keyed audit record is the reference: the edited ledger disagrees with it.
    assert 'the privacy ledger says HeadCT' in checks[dashboard.AUDIT_CHAIN].reason
    assert not checks[dashboard.AUDIT_CHAIN].ok and checks[dashboard.NO_IDENTIFIERS].ok

  @pytest.mark.parametrize('field, value', [
      pytest.param('epsilon_spent', 0.2, id='spend_understated'),
      pytest.param('noise_multiplier', 2.6, id='multiplier_overstated'),
      pytest.param('rounds_released', 2, id='rounds_understated'),
  ])
  def test_ledger_that_the_accountant_contradicts_is_red(self, synthetic, field, value):
    # Each edit keeps the ledger's schema valid and within budget: only recomputing catches it.
    def edit(ledger):
      entry = ledger['categories']['HeadCT']
      entry[field] = value
      for relation in entry['relations'].values():  # Schema 2 repeats each figure per relation.
        if field == 'epsilon_spent':
          relation['epsilon'] = value
        elif field == 'noise_multiplier':
          relation['noise_multiplier'] = value
          relation['rounds'] = [[value, n] for _, n in relation['rounds']]
        else:
          relation['rounds'] = [[relation['rounds'][0][0], value]]
    _edit_ledger(synthetic, edit)
    with open(os.path.join(synthetic, ledger_lib.LEDGER_FILENAME)) as f:
      ledger_lib.validate_ledger_json(json.load(f))
    checks = _checks(synthetic)
    assert not checks[dashboard.LEDGER_CONSISTENT].ok
    assert 'HeadCT' in checks[dashboard.LEDGER_CONSISTENT].reason
    assert checks[dashboard.BUDGET_RESPECTED].ok

  def test_raised_target_is_not_the_policys_budget(self, synthetic):
    def raise_target(ledger):
      ledger['categories']['HeadCT']['target_epsilon'] = 5.0
    _edit_ledger(synthetic, raise_target)
    budget = _checks(synthetic)[dashboard.BUDGET_RESPECTED]
    assert not budget.ok and "not the policy's 0.5" in budget.reason

  def test_invalid_ledger_is_red_with_the_validators_reason(self, synthetic):
    def break_rate(ledger):
      ledger['sampling']['rate'] = 0.5
    _edit_ledger(synthetic, break_rate)
    ledger_check = _checks(synthetic)[dashboard.LEDGER_CONSISTENT]
    assert not ledger_check.ok and 'sampling.rate' in ledger_check.reason

  def test_missing_ledger_is_red(self, synthetic):
    os.remove(os.path.join(synthetic, ledger_lib.LEDGER_FILENAME))
    checks = _checks(synthetic)
    assert not checks[dashboard.BUDGET_RESPECTED].ok
    assert not checks[dashboard.LEDGER_CONSISTENT].ok

  def test_audit_log_that_disagrees_with_the_ledger_is_red(self, synthetic):
    # Even re-keyed by someone holding the key: round 3's spend rewritten, the chain re-MACed.
    path = os.path.join(synthetic, audit_lib.AUDIT_LOG_FILENAME)
    with open(path) as f:
      records = [json.loads(line) for line in f]
    records[-1]['epsilon_spent']['CXR'] = 0.1
    secret = audit_lib.load_key().secret
    prev = audit_lib.GENESIS_MAC
    with open(path, 'w') as f:
      for record in records:
        record['prev_mac'] = prev
        record['mac'] = prev = audit_lib.record_mac(record, secret)
        f.write(json.dumps(record, sort_keys=True, separators=(',', ':')) + '\n')
    checks = _checks(synthetic)
    assert not checks[dashboard.AUDIT_CHAIN].ok
    assert 'the privacy ledger says CXR epsilon_spent' in checks[dashboard.AUDIT_CHAIN].reason
    assert not checks[dashboard.LEDGER_CONSISTENT].ok
    assert 'CXR: audit record of round 3' in checks[dashboard.LEDGER_CONSISTENT].reason


def _audit_lines(run_dir):
  with open(os.path.join(run_dir, audit_lib.AUDIT_LOG_FILENAME)) as f:
    return f.readlines()


def _write_audit_lines(run_dir, lines):
  with open(os.path.join(run_dir, audit_lib.AUDIT_LOG_FILENAME), 'w') as f:
    f.writelines(lines)


def _chain(run_dir):
  return dashboard.check_audit_chain(run_dir)


class TestAuditChainCheck:
  """The keyed verifier behind the dashboard's audit item: green for an intact run, red for each
  tampering. `synthetic` is a copy (no anchor for its path); `in_place` keeps its anchor."""

  @pytest.fixture
  def in_place(self, tmp_path):
    return write_synthetic_run(str(tmp_path / 'run'))

  def test_intact_run_is_green_against_anchor_and_ledger(self, in_place):
    chain = _chain(in_place)
    assert chain.ok, chain.reason
    assert chain.reason.startswith('3 keyed records intact (key id ')
    assert 'the anchor (round 3)' in chain.reason and 'the privacy ledger (3 rounds' in chain.reason

  def test_copied_run_is_green_and_says_what_it_could_not_check(self, synthetic):
    chain = _chain(synthetic)
    assert chain.ok and 'Not checked: records removed from the end' in chain.reason

  def test_edited_record_with_every_hash_recomputed_is_red(self, synthetic):
    # The attack: a middle record's participants and epsilon changed, every later
    # record re-linked and re-hashed with plain SHA-256 (all a forger without the key can do).
    lines = _audit_lines(synthetic)
    records = [json.loads(line) for line in lines]
    records[1]['participants'][0] = 'client_99999'
    records[1]['epsilon_spent']['CXR'] = 0.0
    prev = records[0]['mac']
    for record in records[1:]:
      record['prev_mac'] = prev
      body = {k: v for k, v in record.items() if k != 'mac'}
      record['mac'] = prev = hashlib.sha256(json.dumps(
          body, sort_keys=True, separators=(',', ':')).encode()).hexdigest()
    _write_audit_lines(synthetic, [json.dumps(r, sort_keys=True, separators=(',', ':')) + '\n'
                                   for r in records])
    chain = _chain(synthetic)
    assert not chain.ok
    assert chain.reason.startswith('broken at line 2 (round 2): mac does not match the record')

  def test_tampered_audit_record_breaks_the_chain(self, synthetic):
    lines = _audit_lines(synthetic)
    record = json.loads(lines[1])
    record['update_norm'] = 0.01
    lines[1] = json.dumps(record, sort_keys=True, separators=(',', ':')) + '\n'
    _write_audit_lines(synthetic, lines)
    chain = _chain(synthetic)
    assert not chain.ok and chain.reason.startswith('broken at line 2 (round 2): mac')

  def test_reordered_records_are_red(self, synthetic):
    lines = _audit_lines(synthetic)
    lines[0], lines[1] = lines[1], lines[0]
    _write_audit_lines(synthetic, lines)
    chain = _chain(synthetic)
    assert not chain.ok and chain.reason.startswith('broken at line 1 (round 2): prev_mac')

  def test_records_cut_from_the_end_with_a_ledger_are_red(self, synthetic):
    _write_audit_lines(synthetic, _audit_lines(synthetic)[:-1])
    chain = _chain(synthetic)
    assert not chain.ok
    assert chain.reason.startswith('broken at line 3: expected 3 records (the privacy ledger')

  def test_records_cut_from_the_end_without_a_ledger_are_red(self, in_place):
    # A non-DP run has no ledger: the anchor beside the key still knows where the chain ended.
    os.remove(os.path.join(in_place, ledger_lib.LEDGER_FILENAME))
    records = [json.loads(line) for line in _audit_lines(in_place)[:-1]]
    for record in records:
      for field in ('epsilon_spent', 'client_level_epsilon'):
        record.pop(field)
    # (Records without epsilon need a key to write: rebuild the shortened log with it.)
    _write_audit_lines(in_place, [])
    rebuilt = audit_lib.AuditLog(os.path.join(in_place, audit_lib.AUDIT_LOG_FILENAME))
    os.remove(audit_lib.anchor_path(audit_lib.load_key(), rebuilt.path))
    for record in records:
      rebuilt.append({k: v for k, v in record.items()
                      if k in audit_lib.ALLOWED_FIELDS and k != 'time'})
    assert _chain(in_place).ok
    _write_audit_lines(in_place, _audit_lines(in_place)[:-1])
    chain = _chain(in_place)
    assert not chain.ok
    assert chain.reason == ('broken at line 2: records removed from the end: the log ends at '
                            "round 1, but the custodian's anchored head is round 2")

  def test_edited_ledger_epsilon_is_red(self, synthetic):
    _edit_ledger(synthetic, lambda l: l['categories']['HeadCT'].update(epsilon_spent=0.01))
    chain = _chain(synthetic)
    assert not chain.ok
    assert chain.reason.startswith('broken: the privacy ledger says HeadCT epsilon_spent 0.01, '
                                   'the audit record of round 3 says ')

  def test_wrong_key_is_red_and_named(self, synthetic, tmp_path, monkeypatch):
    other = str(tmp_path / 'other' / 'audit.key')
    audit_lib.load_key(other, create=True)
    monkeypatch.setenv(audit_lib.KEY_FILE_ENV, other)
    chain = _chain(synthetic)
    assert not chain.ok and chain.reason.startswith('wrong key: the log was keyed with key id')

  def test_missing_key_is_red(self, synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv(audit_lib.KEY_FILE_ENV, str(tmp_path / 'absent' / 'audit.key'))
    chain = _chain(synthetic)
    assert not chain.ok and chain.reason.startswith('audit key must be a file. Found none at')

  def test_old_unkeyed_log_is_red_and_called_unkeyed(self, synthetic):
    prev, lines = audit_lib.GENESIS_HASH, []
    for line in _audit_lines(synthetic):
      record = {k: v for k, v in json.loads(line).items() if k in audit_lib.ALLOWED_FIELDS}
      record['prev_hash'] = prev
      record['record_hash'] = prev = audit_lib.record_hash(record)
      lines.append(json.dumps(record, sort_keys=True, separators=(',', ':')) + '\n')
    _write_audit_lines(synthetic, lines)
    chain = _chain(synthetic)
    assert not chain.ok and chain.reason.startswith('unkeyed (not tamper-evident): 3 records')
    # The page still reads its records.
    assert len(dashboard.read_audit_records(synthetic)[0]) == 3


class TestIdentifierScan:

  @pytest.mark.parametrize('name, content, kind', [
      pytest.param('notes.txt', b'PatientName: redacted?\n', 'patient attribute keyword',
                   id='dicom_keyword'),
      pytest.param('sub/export.csv', b'image,patient_id\n1,42\n', 'patient attribute keyword',
                   id='snake_case_keyword'),
      pytest.param('meta.json', b'{"study": "1.2.840.113619.2.55.3.604688"}', 'UID',
                   id='dicom_uid'),
      pytest.param('tags.txt', b'(0010,0020) 12345\n', 'patient tag', id='dicom_tag'),
      pytest.param('log.txt', b'ok\nloaded DOE^JOHN from disk\n', 'person-name', id='person_name'),
      pytest.param('scan.dcm', b'\0' * 128 + b'DICM' + bytes(range(256)), 'DICOM file',
                   id='dicom_file'),
  ])
  def test_planted_identifier_turns_the_item_red(self, synthetic, name, content, kind):
    path = os.path.join(synthetic, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(content)
    findings = dashboard.scan_for_identifiers(synthetic)
    assert [f.path for f in findings] == [name] and kind in findings[0].kind, findings
    check = _checks(synthetic)[dashboard.NO_IDENTIFIERS]
    assert not check.ok and name in check.reason

  def test_reason_locates_without_repeating_the_identifier(self, synthetic):
    with open(os.path.join(synthetic, 'log.txt'), 'w') as f:
      f.write('line one\nPatientID=HOSP-991-22\n')
    check = _checks(synthetic)[dashboard.NO_IDENTIFIERS]
    assert 'log.txt:2' in check.reason and 'HOSP-991-22' not in check.reason

  def test_pseudonyms_hashes_and_metric_names_are_not_flagged(self, synthetic):
    with open(os.path.join(synthetic, 'innocent.txt'), 'w') as f:
      f.write('client_00042 eval/accuracy/HeadCT 1.2.3 version 0.87.0 x^2 '
              'no patient identifiers are kept; patients stay anonymous '
              f'{"ab" * 32} 2.25 1.2.84\n')
    assert dashboard.scan_for_identifiers(synthetic) == []

  def test_the_dashboard_itself_is_not_scanned(self, synthetic):
    with open(os.path.join(synthetic, 'notes.txt'), 'w') as f:
      f.write('PatientName\n')
    output = dashboard.build_dashboard([synthetic], os.path.join(synthetic, 'dashboard.html'))
    os.remove(os.path.join(synthetic, 'notes.txt'))
    # The page names what it found; rescanning must not report the page.
    assert 'notes.txt' in open(output).read()
    assert dashboard.scan_for_identifiers(synthetic) == []


class TestBuild:

  def test_page_is_self_contained_with_the_data_embedded(self, synthetic, tmp_path):
    output = str(tmp_path / 'out' / 'page.html')
    assert dashboard.build_dashboard([synthetic], output) == output
    page, data = page_data(output)
    assert "default-src 'none'" in page  # The page may not fetch anything, even by mistake.
    assert not re.search(r'(?:src|href)\s*=|@import|url\(|<link', page, re.I)
    assert 'uPlot' in page and data['live'] is False
    [run] = data['runs']
    assert run['rounds'] == [1, 2, 3]
    assert [c['id'] for c in data['categories']] == CATS
    assert run['ledger']['rounds_completed'] == 3 and len(run['audit_latest']) == 3
    assert run['participation']['histogram'][0] + run['participation']['distinct_clients'] == 100
    assert all(c['ok'] for c in run['compliance'])
    assert not [n for n in os.listdir(tmp_path / 'out') if n != 'page.html']  # No temp left.

  def test_run_text_cannot_break_out_of_the_page(self, synthetic, tmp_path):
    with open(os.path.join(synthetic, dashboard.CONFIG_FILE)) as f:
      config = json.load(f)
    config['config']['note'] = '</script><script>alert(1)</script> @@UPLOT_JS@@'
    with open(os.path.join(synthetic, dashboard.CONFIG_FILE), 'w') as f:
      json.dump(config, f)
    page, data = page_data(dashboard.build_dashboard([synthetic], str(tmp_path / 'p.html')))
    assert '<script>alert(1)' not in page
    assert ['config.note', json.dumps(config['config']['note'])] in data['runs'][0]['config']

  def test_live_flag_and_a_run_before_its_first_round(self, tmp_path):
    run_dir = tmp_path / 'fresh'
    run_dir.mkdir()
    (run_dir / 'config.json').write_text(json.dumps({'config': {'dp': True, 'policy': ''}}))
    _, data = page_data(dashboard.build_dashboard([str(run_dir)], str(run_dir / 'd.html'),
                                                   live=True))
    assert data['live'] is True and data['runs'][0]['rounds'] == []

  def test_the_custodians_page_says_it_is_confidential_and_how_to_publish(self, synthetic,
                                                                           tmp_path):
    page, data = page_data(dashboard.build_dashboard([synthetic], str(tmp_path / 'p.html')))
    notice = page[page.index(f'id="{dashboard.NOTICE_ID}"'):page.index('<div id="app">')]
    assert 'CONFIDENTIAL: participants.' in notice and 'experiments/release.py' in notice
    assert page.index(dashboard.NOTICE_ID) < page.index('<script')  # Shown without scripts.
    assert data['public'] is False
    # Its panels stay: audit records with participants, config, participation by client.
    [run] = data['runs']
    assert run['audit_latest'][0]['participants'] and run['config']
    assert run['participation']['distinct_clients'] > 0

  def test_public_page_shows_no_client_id_audit_record_config_or_timing(self, synthetic,
                                                                         tmp_path):
    # Built from a full run directory: public mode must not read its confidential files.
    page, data = page_data(dashboard.build_dashboard([synthetic], str(tmp_path / 'p.html'),
                                                      public=True, names=['demo']))
    assert data['public'] is True and 'Public dashboard.' in page and 'CONFIDENTIAL' not in page
    audit = audit_lib.AuditLog(os.path.join(synthetic, audit_lib.AUDIT_LOG_FILENAME))
    records = list(audit.records())
    participants = {p for r in records for p in r['participants']}
    assert participants and not [p for p in participants if p in page]
    # No audit record: none of its hashes (chain, model) is on the page.
    hashes = [v for r in records for v in r.values()
              if isinstance(v, str) and re.fullmatch('[0-9a-f]{32,}', v)]
    assert hashes and not [h for h in hashes if h in page]
    assert 'round_seconds' not in page and synthetic not in page
    [run] = data['runs']
    assert run['name'] == 'demo' and run['path'] == ''
    assert (run['audit_latest'], run['audit_count'], run['config'],
            run['participation']) == ([], 0, [], None)
    # The exact sample size is not accounted: the public page leaves it out.
    assert 'num_clients' not in run['series']
    assert set(run['series']) >= {'eval/accuracy/HeadCT', 'epsilon/CXR', 'clip_norm/Hand',
                                  'update_norm', 'client_level_epsilon'}
    # The policy as the ledger records it, with the applied noise multipliers.
    assert [(b['id'], b['epsilon']) for b in run['policy']['categories']] == [
        (b.id, b.epsilon) for b in policy_lib.default_policy().budgets]
    assert run['planned_noise_multipliers'] == _Z
    checks = {c['id']: c for c in run['compliance']}
    assert list(checks) == [dashboard.BUDGET_RESPECTED, dashboard.LEDGER_CONSISTENT,
                            dashboard.NO_IDENTIFIERS]
    assert all(c['ok'] for c in checks.values()), checks
    assert 'targets the ledger states' in checks[dashboard.BUDGET_RESPECTED]['reason']

  def test_public_page_works_from_the_publishable_files_alone(self, synthetic, tmp_path):
    bundle = tmp_path / 'bundle'
    bundle.mkdir()
    for name in (ledger_lib.LEDGER_FILENAME, dashboard.METRICS_FILE):
      shutil.copy(os.path.join(synthetic, name), bundle / name)
    _, data = page_data(dashboard.build_dashboard([str(bundle)], str(bundle / 'p.html'),
                                                   public=True))
    [run] = data['runs']
    assert run['problems'] == [] and run['rounds'] == [1, 2, 3]
    assert all(c['ok'] for c in run['compliance'])
    # And an overspent ledger is red on the public page as well.
    _edit_ledger(str(bundle), lambda l: l['categories']['HeadCT'].update(epsilon_spent=0.7))
    checks = {c.id: c for c in dashboard.public_compliance(str(bundle))}
    assert not checks[dashboard.BUDGET_RESPECTED].ok
    assert 'HeadCT: spent 0.7 > budget 0.5' in checks[dashboard.BUDGET_RESPECTED].reason

  def test_public_page_drops_unpublishable_metric_columns(self, synthetic, tmp_path):
    # Even from a metrics.csv the release did not filter.
    path = os.path.join(synthetic, dashboard.METRICS_FILE)
    with open(path, newline='') as f:
      rows = list(csv.DictReader(f))
    for row in rows:
      row['train/accuracy'] = '0.9'
    with open(path, 'w', newline='') as f:
      writer = csv.DictWriter(f, list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
    _, data = page_data(dashboard.build_dashboard([synthetic], str(tmp_path / 'p.html'),
                                                   public=True))
    series = data['runs'][0]['series']
    assert 'train/accuracy' not in series and 'round_seconds' not in series
    _, custodian = page_data(dashboard.build_dashboard([synthetic], str(tmp_path / 'c.html')))
    assert 'train/accuracy' in custodian['runs'][0]['series']

  def test_names_must_match_the_run_dirs(self, synthetic, tmp_path):
    with pytest.raises(dashboard.DashboardError, match='one non-empty name per run'):
      dashboard.build_dashboard([synthetic], str(tmp_path / 'd.html'), names=['a', 'b'])

  def test_missing_run_dir_is_refused(self, tmp_path):
    with pytest.raises(dashboard.DashboardError, match='Found none at'):
      dashboard.build_dashboard([str(tmp_path / 'nope')], str(tmp_path / 'd.html'))
    with pytest.raises(dashboard.DashboardError, match='non-empty list'):
      dashboard.build_dashboard([], str(tmp_path / 'd.html'))


def test_page_files_are_package_data():
  # The page's HTML/CSS/JS and the chart library are read from the package at render time: an
  # installed package lacks any file setup.py's package_data does not list.
  with open(os.path.join(REPO, 'setup.py')) as f:
    call = next(n for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.keyword) and
                n.arg == 'package_data')
  globs = ast.literal_eval(call.value)['tff_medical']
  package = os.path.join(REPO, 'tff_medical')
  monitoring = os.path.join(package, 'monitoring')
  shipped = [os.path.relpath(os.path.join(root, name), package)
             for folder in ('templates', 'vendor')
             for root, _, names in os.walk(os.path.join(monitoring, folder)) for name in names]
  assert any(p.startswith('monitoring/templates/') for p in shipped)
  assert [p for p in shipped if not any(fnmatch.fnmatch(p, g) for g in globs)] == []


@pytest.mark.slow  # End-to-end tier: the entry point in a fresh interpreter.
class TestCli:

  def _run(self, *args, cwd=REPO):
    return subprocess.run([sys.executable, CLI, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)

  def test_one_run_defaults_into_the_run_dir(self, synthetic):
    done = self._run(f'--run_dirs={synthetic}')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == os.path.join(synthetic, 'dashboard.html')
    assert os.path.isfile(done.stdout.strip())

  def test_several_runs_default_to_the_working_dir_and_errors_exit_1(self, synthetic, tmp_path):
    other = shutil.copytree(synthetic, str(tmp_path / 'other'))
    done = self._run(f'--run_dirs={synthetic},{other}', cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'dashboard.html'
    _, data = page_data(str(tmp_path / 'dashboard.html'))
    assert [r['name'] for r in data['runs']] == ['run', 'other']
    missing = self._run(f'--run_dirs={tmp_path / "missing"}')
    assert missing.returncode == 1 and 'error: run_dir must be a folder' in missing.stderr
    stray = self._run(f'--run_dirs={synthetic}', 'extra')
    assert stray.returncode == 1 and 'Unexpected arguments: extra' in stray.stderr


# The browser tests.


@pytest.fixture(scope='session')
def chromium():
  """Debian's Chromium; installed by tests/install_browser.sh when missing (never skipped)."""
  if not os.access(CHROMIUM, os.X_OK):
    subprocess.run(['bash', INSTALL_BROWSER], check=True, timeout=1200)
  assert os.access(CHROMIUM, os.X_OK), f'{CHROMIUM} missing after {INSTALL_BROWSER}'
  return CHROMIUM


@pytest.fixture(scope='module')
def browser(chromium, tmp_path_factory):
  instance = Browser(chromium, str(tmp_path_factory.mktemp('chromium') / 'chromium.log'))
  yield instance
  instance.close()


@pytest.fixture(scope='module')
def real_run(tmp_path_factory, tff_context):
  """A 3-round DP run whose dashboard is rebuilt after every round, as training does."""
  del tff_context
  from tff_medical.training import program  # pylint: disable=g-import-not-at-top

  run_dir = str(tmp_path_factory.mktemp('runs') / 'smoke')
  output = os.path.join(run_dir, dashboard.DASHBOARD_FILENAME)
  seen = []

  def on_round(record):
    dashboard.build_dashboard([run_dir], output, live=True)
    _, data = page_data(output)
    seen.append((record['round'], data['live'], data['runs'][0]['rounds']))

  program.run(smoke_config(total_rounds=3, eval_every=2), run_dir, on_round=on_round)
  dashboard.build_dashboard([run_dir], output, live=False)
  return run_dir, seen


@pytest.mark.slow  # End-to-end tier: a real Chromium.
class TestBrowser:

  def test_the_dashboard_is_rebuilt_live_every_round(self, real_run):
    _, seen = real_run
    assert seen == [(1, True, [1]), (2, True, [1, 2]), (3, True, [1, 2, 3])]

  def test_every_panel_holds_the_run_offline_and_without_errors(self, real_run, browser):
    run_dir, _ = real_run
    page = browser.open(os.path.join(run_dir, dashboard.DASHBOARD_FILENAME))
    check = page.self_check()
    assert page.problems() == []
    assert check['errors'] == [] and check['resources'] == []
    # Only the page itself was loaded, from the file system.
    assert page.requests() == ['file://' + os.path.join(run_dir, dashboard.DASHBOARD_FILENAME)]
    assert check['live'] is False
    [run] = check['runs']
    assert run['rounds'] == 3 and run['categories'] == CATS
    for name in CHART_PANELS:
      panel = run['panels'][name]
      assert panel['series'] >= 1 and panel['points'] >= 1, (name, panel)
      assert panel['rounds'] == 3, (name, panel)
      assert panel['legend'] == panel['series'], (name, panel)
    # Six categories (+ budgets) in every per-category chart; eval every 2 rounds plus the last.
    assert run['panels']['epsilon']['series'] == 1 + 2 * 6
    assert run['panels']['clip_norm']['series'] == 6
    assert run['panels']['accuracy']['series'] == 7 and run['panels']['accuracy']['points'] == 2
    assert run['tables'] == {'budget': 6, 'policy': 6, 'audit': 3,
                             'config': run['tables']['config']}
    assert run['tables']['config'] > 10
    assert run['compliance'] == {dashboard.BUDGET_RESPECTED: True,
                                 dashboard.LEDGER_CONSISTENT: True, dashboard.AUDIT_CHAIN: True,
                                 dashboard.NO_IDENTIFIERS: True}
    assert page.evaluate("document.querySelectorAll('ul.compliance li.ok').length") == 4
    assert page.evaluate(f"document.getElementById('{dashboard.NOTICE_ID}').innerText").startswith(
        'CONFIDENTIAL: participants.')
    screenshot = README_SCREENSHOT if UPDATE_SCREENSHOT else os.path.join(run_dir, 'shot.png')
    page.screenshot(screenshot)
    with open(screenshot, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  def test_the_public_page_renders_its_panels_only(self, real_run, browser, tmp_path):
    run_dir, _ = real_run
    output = dashboard.build_dashboard([run_dir], str(tmp_path / 'public.html'), public=True)
    page = browser.open(output)
    check = page.self_check()
    assert page.problems() == [] and check['errors'] == [] and check['resources'] == []
    assert page.requests() == ['file://' + output]
    [run] = check['runs']
    assert set(run['panels']) == set(CHART_PANELS) - {'participation'}
    for name, panel in run['panels'].items():
      if name == 'clients':  # Not published: shown empty, with the reason.
        assert panel['points'] == 0, panel
        continue
      assert panel['series'] >= 1 and panel['points'] >= 1 and panel['rounds'] == 3, (name, panel)
    assert run['tables'] == {'budget': 6, 'policy': 6}  # No audit records, no config.
    assert run['compliance'] == {dashboard.BUDGET_RESPECTED: True,
                                 dashboard.LEDGER_CONSISTENT: True,
                                 dashboard.NO_IDENTIFIERS: True}
    text = page.evaluate('document.body.innerText')
    assert text.index('Public dashboard.') < text.index('Privacy budget per category')
    assert 'client_' not in text and run_dir not in text

  def test_charts_hover_zoom_and_toggle(self, real_run, browser):
    run_dir, _ = real_run
    page = browser.open(os.path.join(run_dir, dashboard.DASHBOARD_FILENAME), height=900)
    find = ("var u = window.dashboardCharts.find(function (c) { "
            "return /:epsilon$/.test(c.dashboardKey); });")
    box = page.evaluate(find + "u.over.scrollIntoView({block: 'center'}); "
                        "var r = u.over.getBoundingClientRect(); "
                        "[r.left, r.top, r.width, r.height]")
    left, top, width, height = box
    # Hover: the legend shows the value under the cursor.
    page.mouse('mouseMoved', left + width * 0.98, top + height / 2)
    assert page.evaluate(find + "u.cursor.idx") == 2
    value = page.evaluate(find + "u.root.querySelectorAll('.u-legend .u-value')[1].textContent")
    assert float(value) > 0
    # Drag to zoom into rounds 1..2.
    before = page.evaluate(find + "[u.scales.x.min, u.scales.x.max]")
    page.mouse('mouseMoved', left + 2, top + height / 2)
    page.mouse('mousePressed', left + 2, top + height / 2, buttons=1)
    page.mouse('mouseMoved', left + width * 0.6, top + height / 2, buttons=1)
    page.mouse('mouseReleased', left + width * 0.6, top + height / 2)
    after = page.evaluate(find + "[u.scales.x.min, u.scales.x.max]")
    assert after[1] < before[1] and after[1] - after[0] < before[1] - before[0], (before, after)
    # Click a legend entry to hide its series, again to show it.
    toggle = (find + "u.root.querySelectorAll('.u-legend .u-series')[2]"
              ".querySelector('th').click(); u.series[2].show")
    assert page.evaluate(toggle) is False
    assert page.evaluate(toggle) is True
    assert page.problems() == []

  def test_tampered_ledger_shows_red_beside_the_honest_run(self, real_run, browser, tmp_path):
    run_dir, _ = real_run
    tampered = shutil.copytree(run_dir, str(tmp_path / 'tampered'),
                               ignore=shutil.ignore_patterns('checkpoints', 'tensorboard'))

    def understate(ledger):  # Consistently, so that only recomputing catches it.
      ledger['categories']['CXR']['epsilon_spent'] *= 0.5
      for figures in ledger['categories']['CXR']['relations'].values():
        figures['epsilon'] *= 0.5
    _edit_ledger(tampered, understate)
    output = dashboard.build_dashboard([run_dir, tampered], str(tmp_path / 'both.html'))
    page = browser.open(output)
    check = page.self_check()
    assert page.problems() == [] and page.requests() == ['file://' + output]
    honest, bad = check['runs']
    assert all(honest['compliance'].values())
    assert bad['compliance'][dashboard.LEDGER_CONSISTENT] is False
    # The keyed audit record of the last round is the reference: it disagrees with the ledger.
    assert bad['compliance'][dashboard.AUDIT_CHAIN] is False
    red = page.evaluate("Array.from(document.querySelectorAll('#run-1 ul.compliance li.bad'))"
                        ".map(function (li) { return li.dataset.check + ': ' + "
                        "li.querySelector('.reason').textContent; })")
    assert len(red) == 2 and red[0].startswith(dashboard.LEDGER_CONSISTENT + ': CXR: ledger')
    assert red[1].startswith(dashboard.AUDIT_CHAIN), red
    # Side by side: one curve per run on each overlay.
    for name in ('accuracy', 'epsilon', 'loss'):
      assert check['compare'][name]['series'] == 2, check['compare']

  def test_a_live_page_reloads_until_the_final_write(self, real_run, browser, tmp_path):
    run_dir, _ = real_run
    output = str(tmp_path / 'live.html')
    dashboard.build_dashboard([run_dir], output, live=True, refresh_seconds=0.5)
    page = browser.open(output)
    assert page.self_check()['live'] is True
    browser.pump(1.5)
    assert len(page.events('Page.loadEventFired')) >= 2
    dashboard.build_dashboard([run_dir], output, live=False)
    browser.pump(1.5)  # The next reload picks up the final page, which stops reloading.
    assert page.self_check()['live'] is False
    loads = len(page.events('Page.loadEventFired'))
    browser.pump(1.5)
    assert len(page.events('Page.loadEventFired')) == loads
    assert page.problems() == []
