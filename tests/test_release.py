"""The release boundary: the publishable bundle, its refusals, its scan, and the release command.

The run directory is the dashboard tests' synthetic run (ledger, audit log, metrics with
round_seconds, config) plus a partition manifest, a model card and a stand-in SavedModel (the
command copies the model's files, it does not load them), with the confidential files
owner-only as the training program writes them.
"""

import csv
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from helpers import page_data  # pylint: disable=g-bad-import-order
from test_dashboard import write_synthetic_run  # pylint: disable=g-bad-import-order
from tff_medical import run_files
from tff_medical.export import release
from tff_medical.monitoring import dashboard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, 'experiments', 'release.py')
NUM_CLIENTS = 100
CLIENT_IDS = [f'client_{i:05d}' for i in range(NUM_CLIENTS)]
ADDED = {run_files.PUBLIC_DASHBOARD_FILE, run_files.BUNDLE_MANIFEST_FILE}


def _write_run(run_dir):
  write_synthetic_run(run_dir)
  with open(os.path.join(run_dir, run_files.MANIFEST_FILE), 'w') as f:
    json.dump({'format': 1, 'clients': {c: {'train': [i], 'category_counts': {'CXR': 1}}
                                        for i, c in enumerate(CLIENT_IDS)}}, f)
  with open(os.path.join(run_dir, run_files.MODEL_CARD_FILE), 'w') as f:
    json.dump({'schema_version': 1, 'data_source': 'phantoms', 'rounds': 3}, f)
  model = os.path.join(run_dir, run_files.SAVED_MODEL_DIR)
  os.makedirs(os.path.join(model, 'variables'))
  with open(os.path.join(model, 'saved_model.pb'), 'wb') as f:
    f.write(bytes(range(256)) * 8)
  with open(os.path.join(model, 'variables', 'variables.data-00000-of-00001'), 'wb') as f:
    f.write(os.urandom(1 << 14))
  os.makedirs(os.path.join(run_dir, run_files.CHECKPOINT_DIR, 'ckpt_3'))
  with open(os.path.join(run_dir, run_files.CHECKPOINT_DIR, 'ckpt_3', 'state'), 'wb') as f:
    f.write(b'sampler secret')
  dashboard.build_dashboard([run_dir], os.path.join(run_dir, run_files.DASHBOARD_FILE))
  # Owner-only, as the program writes a run directory: the bundle must not inherit it.
  for root, dirs, files in os.walk(run_dir):
    for name in dirs:
      os.chmod(os.path.join(root, name), 0o700)
    for name in files:
      os.chmod(os.path.join(root, name), 0o600)
  return run_dir


@pytest.fixture(scope='module')
def run_template(tmp_path_factory):
  return _write_run(str(tmp_path_factory.mktemp('release') / 'run'))


@pytest.fixture
def run(run_template, tmp_path):
  return shutil.copytree(run_template, str(tmp_path / 'run'))


@pytest.fixture(scope='module')
def bundle(run_template, tmp_path_factory):
  output = str(tmp_path_factory.mktemp('published') / 'bundle')
  return release.assemble(run_template, output)


def _all_files(folder):
  return sorted(os.path.relpath(os.path.join(root, name), folder)
                for root, _, files in os.walk(folder) for name in files)


class TestBundle:

  def test_only_publishable_entries_are_in_the_bundle(self, bundle):
    top = set(os.listdir(bundle.output))
    assert top == {run_files.SAVED_MODEL_DIR, run_files.MODEL_CARD_FILE, run_files.LEDGER_FILE,
                   run_files.METRICS_FILE} | ADDED
    assert not top & run_files.CONFIDENTIAL
    assert all(run_files.is_publishable(n) for n in top - ADDED)
    assert sorted(bundle.files) == _all_files(bundle.output)

  def test_metrics_keep_publishable_columns_and_their_values(self, bundle, run_template):
    with open(os.path.join(run_template, run_files.METRICS_FILE), newline='') as f:
      source = list(csv.DictReader(f))
    with open(os.path.join(bundle.output, run_files.METRICS_FILE), newline='') as f:
      reader = csv.DictReader(f)
      published = list(reader)
      header = reader.fieldnames
    assert 'round_seconds' in source[0]  # The synthetic run has per-round timing ...
    assert 'round_seconds' not in header  # ... the bundle does not.
    # The exact Poisson sample size is not accounted: only the expected one (ledger) is public.
    assert bundle.dropped_columns == ('num_clients', 'round_seconds')
    assert all(run_files.is_publishable_metric(c) for c in header)
    assert set(header) == set(source[0]) - {'round_seconds', 'num_clients'}
    assert [{c: r[c] for c in header} for r in source] == published

  def test_columns_off_the_allowlist_are_dropped_and_listed(self, run, tmp_path):
    path = os.path.join(run, run_files.METRICS_FILE)
    with open(path, newline='') as f:
      rows = list(csv.DictReader(f))
    for row in rows:
      # Training metrics of a non-DP run, and a column nobody vetted.
      row.update({'train/accuracy': '0.9', 'site_note': 'x', 'eval_wall/seconds': '2'})
    with open(path, 'w', newline='') as f:
      writer = csv.DictWriter(f, list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
    result = release.assemble(run, str(tmp_path / 'out'))
    assert result.dropped_columns == ('num_clients', 'round_seconds', 'train/accuracy',
                                      'site_note', 'eval_wall/seconds')
    with open(os.path.join(result.output, run_files.METRICS_FILE), newline='') as f:
      assert not set(next(csv.reader(f))) & set(result.dropped_columns)

  def test_no_client_id_anywhere_in_the_bundle(self, bundle, run_template):
    # Brute force, independent of the release's own scanner.
    with open(os.path.join(run_template, run_files.AUDIT_FILE)) as f:
      participants = {p for line in f for p in json.loads(line)['participants']}
    assert participants and participants <= set(CLIENT_IDS)
    for rel in bundle.files:
      with open(os.path.join(bundle.output, rel), 'rb') as f:
        data = f.read()
      assert not [c for c in CLIENT_IDS if c.encode() in data], rel
      assert b'round_seconds' not in data, rel
    assert bundle.client_ids_checked == NUM_CLIENTS

  def test_manifest_lists_every_file_with_its_sha256(self, bundle):
    with open(os.path.join(bundle.output, run_files.BUNDLE_MANIFEST_FILE)) as f:
      manifest = json.load(f)
    listed = {entry['path']: entry for entry in manifest['files']}
    assert set(listed) == set(_all_files(bundle.output)) - {run_files.BUNDLE_MANIFEST_FILE}
    for rel, entry in listed.items():
      with open(os.path.join(bundle.output, rel), 'rb') as f:
        data = f.read()
      assert entry['sha256'] == hashlib.sha256(data).hexdigest(), rel
      assert entry['bytes'] == len(data)
    assert manifest['run'] == 'run'

  def test_the_bundle_is_readable_by_anyone(self, bundle):
    # The run's files are 0600; a bundle is for publication.
    for root, dirs, files in os.walk(bundle.output):
      assert stat.S_IMODE(os.stat(root).st_mode) == 0o755, root
      for name in files:
        assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o644, name
    assert not [n for n in os.listdir(os.path.dirname(bundle.output))
                if n != os.path.basename(bundle.output)]  # No staging folder left.

  def test_public_dashboard_is_rendered_without_ids_audit_or_config(self, bundle, run_template):
    page, data = page_data(os.path.join(bundle.output, run_files.PUBLIC_DASHBOARD_FILE))
    assert data['public'] is True and 'Public dashboard.' in page
    [run] = data['runs']
    assert run['audit_latest'] == [] and run['config'] == [] and run['participation'] is None
    assert run['path'] == ''
    # Not even participation counts: a Poisson sample's size is not in the accountant.
    assert 'num_clients' not in run['series']
    assert 'round_seconds' not in run['series']
    assert [c['id'] for c in run['compliance']] == [dashboard.BUDGET_RESPECTED,
                                                    dashboard.LEDGER_CONSISTENT,
                                                    dashboard.NO_IDENTIFIERS]
    assert all(c['ok'] for c in run['compliance'])
    with open(os.path.join(run_template, run_files.AUDIT_FILE)) as f:
      hashes = [v for line in f for v in json.loads(line).values()
                if isinstance(v, str) and re.fullmatch('[0-9a-f]{32,}', v)]
    assert hashes and not [h for h in hashes if h in page]  # No audit record, not its hashes.
    # Rendered anew: not the custodian's page.
    with open(os.path.join(run_template, run_files.DASHBOARD_FILE)) as f:
      assert 'CONFIDENTIAL' in f.read() and 'CONFIDENTIAL' not in page

  def test_optional_publishable_files_come_along(self, run, tmp_path):
    with open(os.path.join(run, run_files.EMPIRICAL_AUDIT_FILE), 'w') as f:
      json.dump({'lower_bound_epsilon': 0.1}, f)
    result = release.assemble(run, str(tmp_path / 'out'))
    assert run_files.EMPIRICAL_AUDIT_FILE in result.files
    assert run_files.CLIENT_LEDGER_FILE not in result.files


def _tree(folder):
  return sorted(os.path.join(root, name) for root, dirs, files in os.walk(folder)
                for name in dirs + files)


def _refused(run, output, match, **kwargs):
  # Nothing written: neither beside the output nor in the run directory.
  watched = os.path.dirname(run)
  before = _tree(watched)
  with pytest.raises(release.ReleaseError, match=match):
    release.assemble(run, output, **kwargs)
  assert _tree(watched) == before


class TestRefusals:

  @pytest.mark.parametrize('name', sorted(run_files.CONFIDENTIAL))
  def test_a_confidential_file_is_refused(self, run, tmp_path, name):
    _refused(run, str(tmp_path / 'out'), f'Refusing to include {name}: it is confidential',
             include=[name])

  @pytest.mark.parametrize('name', ['notes.txt', 'checkpoints/ckpt_3/state', '../run/config.json',
                                    'tensorboard/'])
  def test_an_unknown_or_nested_entry_is_refused(self, run, tmp_path, name):
    _refused(run, str(tmp_path / 'out'), 'Refusing to include', include=[name])

  def test_a_publishable_include_that_is_absent_is_an_error(self, run, tmp_path):
    _refused(run, str(tmp_path / 'out'), 'lacks empirical_audit.json',
             include=['empirical_audit.json'])

  def test_output_inside_the_run_directory_is_refused(self, run, tmp_path):
    _refused(run, os.path.join(run, 'bundle'), 'outside the run directory')
    _refused(run, os.path.join(run, 'checkpoints', 'bundle'), 'outside the run directory')
    link = str(tmp_path / 'link')
    os.symlink(os.path.join(run, 'checkpoints'), link)
    _refused(run, os.path.join(link, 'bundle'), 'outside the run directory')

  def test_a_non_empty_output_is_refused_and_an_empty_one_used(self, run, tmp_path):
    output = tmp_path / 'out'
    output.mkdir()
    (output / 'old.txt').write_text('keep me')
    with pytest.raises(release.ReleaseError, match='with content'):
      release.assemble(run, str(output))
    assert os.listdir(output) == ['old.txt']
    (output / 'old.txt').unlink()
    assert run_files.MODEL_CARD_FILE in release.assemble(run, str(output)).files

  def test_a_run_without_an_exported_model_is_refused(self, run, tmp_path):
    shutil.rmtree(os.path.join(run, run_files.SAVED_MODEL_DIR))
    _refused(run, str(tmp_path / 'out'), 'lacks saved_model .*export.py')

  def test_a_linked_publishable_file_is_refused(self, run, tmp_path):
    card = os.path.join(run, run_files.MODEL_CARD_FILE)
    os.remove(card)
    os.symlink(os.path.join(run, run_files.MANIFEST_FILE), card)
    _refused(run, str(tmp_path / 'out'), 'symbolic link')

  def test_an_overspent_ledger_is_not_published(self, run, tmp_path):
    path = os.path.join(run, run_files.LEDGER_FILE)
    with open(path) as f:
      ledger = json.load(f)
    ledger['categories']['HeadCT']['epsilon_spent'] = 0.7
    with open(path, 'w') as f:
      json.dump(ledger, f)
    # The parent folders it had to make are gone again too.
    _refused(run, str(tmp_path / 'deep' / 'out'), 'HeadCT: spent 0.7 > budget 0.5')


class TestScan:
  """Defence in depth: what slips past the allowlist is caught before anything is published."""

  def test_a_client_id_in_a_published_file_fails_the_release(self, run, tmp_path):
    with open(os.path.join(run, run_files.MODEL_CARD_FILE), 'w') as f:
      json.dump({'note': 'trained with help from client_00042'}, f)
    _refused(run, str(tmp_path / 'out'), r'client ids of the run found in model_card.json')

  def test_round_timing_in_a_published_file_fails_the_release(self, run, tmp_path):
    with open(os.path.join(run, run_files.EMPIRICAL_AUDIT_FILE), 'w') as f:
      json.dump({'round_seconds': [1.5, 1.6]}, f)
    _refused(run, str(tmp_path / 'out'), 'per-round timing found in empirical_audit.json')

  def test_the_error_names_files_not_ids(self, run, tmp_path):
    with open(os.path.join(run, run_files.MODEL_CARD_FILE), 'w') as f:
      f.write('client_00042 client_00007')
    with pytest.raises(release.ReleaseError) as error:
      release.assemble(run, str(tmp_path / 'out'))
    assert '2 distinct' in str(error.value) and 'client_000' not in str(error.value)

  @pytest.mark.parametrize('data, count', [
      pytest.param(b'xxclient_00042yy', 1, id='inside_a_token'),
      pytest.param(b'\x00\xffclient_00007\x01client_00007', 1, id='binary_twice'),
      pytest.param(b'client_0004 client_000420', 1, id='prefix_and_longer'),
      pytest.param(b'client_0004 CLIENT_00042 client-00042', 0, id='near_misses'),
  ])
  def test_the_id_scanner(self, data, count):
    # 'client_000420' holds client_00042 (and is no id itself): substrings count.
    assert release._IdScanner(CLIENT_IDS).count(data) == count  # pylint: disable=protected-access

  def test_a_run_with_no_known_client_ids_is_refused(self, run, tmp_path):
    os.remove(os.path.join(run, run_files.MANIFEST_FILE))
    os.remove(os.path.join(run, run_files.AUDIT_FILE))
    _refused(run, str(tmp_path / 'out'), 'Cannot check the bundle for client ids')


@pytest.mark.slow  # End-to-end tier: the entry point in a fresh interpreter.
class TestCli:

  def _run(self, *args):
    return subprocess.run([sys.executable, CLI, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)

  def test_writes_the_bundle_and_lists_dropped_columns(self, run, tmp_path):
    output = str(tmp_path / 'out')
    done = self._run(f'--run_dir={run}', f'--output={output}')
    assert done.returncode == 0, done.stderr
    assert f'Wrote the publishable bundle {output}' in done.stdout
    assert ('Left out of metrics.csv (not publishable): num_clients, round_seconds'
            in done.stdout)
    assert os.path.isfile(os.path.join(output, run_files.BUNDLE_MANIFEST_FILE))

  @pytest.mark.parametrize('extra, message', [
      pytest.param(['stray'], 'Unexpected arguments: stray', id='stray_argument'),
      pytest.param(['--include=audit_log.jsonl'],
                   'error: Refusing to include audit_log.jsonl: it is confidential',
                   id='confidential'),
  ])
  def test_bad_usage_is_one_line_without_traceback(self, run, tmp_path, extra, message):
    done = self._run(f'--run_dir={run}', f'--output={tmp_path / "out"}', *extra)
    assert done.returncode != 0
    assert message in done.stderr and 'Traceback' not in done.stderr
    assert not os.path.exists(tmp_path / 'out')
    if message.startswith('error:'):
      assert done.stderr.strip().count('\n') == 0, done.stderr


@pytest.mark.slow
def test_the_bundle_of_a_real_run_holds_no_client_id_or_timing(tmp_path, tff_context):
  """End to end: a small DP training run, exported and released."""
  del tff_context
  from helpers import smoke_config  # pylint: disable=g-import-not-at-top
  from tff_medical.training import program  # pylint: disable=g-import-not-at-top

  run_dir = str(tmp_path / 'runs' / 'smoke')
  program.export(program.run(smoke_config(total_rounds=2, eval_every=2), run_dir))
  with open(os.path.join(run_dir, run_files.MANIFEST_FILE)) as f:
    ids = list(json.load(f)['clients'])
  result = release.assemble(run_dir, str(tmp_path / 'bundle'))
  with open(os.path.join(result.output, run_files.METRICS_FILE), newline='') as f:
    assert all(run_files.is_publishable_metric(c) for c in next(csv.reader(f)))
  assert result.client_ids_checked == len(ids) > 0
  for rel in result.files:
    assert run_files.is_publishable(rel.split('/')[0]) or rel in ADDED, rel
    with open(os.path.join(result.output, rel), 'rb') as f:
      data = f.read()
    assert not [c for c in ids if c.encode() in data], rel
    assert b'round_seconds' not in data, rel
