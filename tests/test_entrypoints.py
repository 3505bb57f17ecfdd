"""The experiment scripts as a user runs them: outputs, sockets, processes, errors, kill -9."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tff_medical.monitoring import audit as audit_lib

# End-to-end tier (make test-e2e): entry-point subprocesses.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, 'experiments', 'train.py')
SMALL = ['--config=configs/smoke.py', '--config.num_per_category=40', '--config.num_clients=100',
         '--config.clients_per_round=10', '--config.model.conv_filters=(4,)',
         '--config.clip.max_count_noise_fraction=1.0']


def _tree(root_pid: int) -> set[int]:
  parents = {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          parents[int(entry)] = int(f.read().rsplit(')', 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
  tree, grew = {root_pid}, True
  while grew:
    grew = False
    for pid, parent in parents.items():
      if parent in tree and pid not in tree:
        tree.add(pid)
        grew = True
  return tree


def _listening_addresses(pids: set[int]) -> list[str]:
  """Local addresses of TCP sockets in LISTEN state held by any of `pids`."""
  inodes = set()
  for pid in pids:
    try:
      for fd in os.listdir(f'/proc/{pid}/fd'):
        target = os.readlink(f'/proc/{pid}/fd/{fd}')
        if target.startswith('socket:['):
          inodes.add(target[8:-1])
    except OSError:
      continue
  found = []
  for table in ('/proc/net/tcp', '/proc/net/tcp6'):
    with open(table) as f:
      for line in f.readlines()[1:]:
        fields = line.split()
        if fields[3] == '0A' and fields[9] in inodes:
          found.append(fields[1].split(':')[0])
  return found


def _worker_pids(pids: set[int]) -> set[int]:
  workers = set()
  for pid in pids:
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if b'worker_binary' in f.read():
          workers.add(pid)
    except OSError:
      continue
  return workers


def _gone(pids: set[int], timeout: float = 20.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    alive = [p for p in pids if os.path.exists(f'/proc/{p}') and
             open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z']
    if not alive:
      return True
    time.sleep(0.2)
  return False


def _start(args, tmp_path):
  return subprocess.Popen([sys.executable, TRAIN, *args, f'--root_output_dir={tmp_path}'],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metric_rounds(run_dir):
  path = os.path.join(run_dir, 'metrics.csv')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [int(r['round']) for r in csv.DictReader(f)]


def test_train_script_end_to_end_confined_and_clean(tmp_path):
  child = _start([*SMALL, '--config.total_rounds=2', '--experiment_name=cli'], tmp_path)
  seen_workers, exposed, samples = set(), [], 0
  while child.poll() is None:
    tree = _tree(child.pid)
    seen_workers |= _worker_pids(tree)
    # The worker serves a Unix socket in a private directory: no TCP port, loopback included.
    exposed += _listening_addresses(tree)
    samples += bool(_worker_pids(tree))
    time.sleep(0.5)
  out, err = child.communicate()
  assert child.returncode == 0, err[-3000:]
  assert seen_workers, 'the run should have started a TFF worker'
  assert samples > 0, 'no worker was ever seen while the run went on'
  assert not exposed, f'listening on TCP: {exposed}'
  assert _gone(seen_workers), 'a TFF worker outlived the script'
  run_dir = tmp_path / 'cli'
  for name in ('privacy_ledger.json', 'audit_log.jsonl', 'metrics.csv', 'config.json',
               'model_card.json', 'saved_model', 'tensorboard', 'dashboard.html'):
    assert (run_dir / name).exists(), name
  for expected in ('Head CT', 'Hand X-ray', 'Epsilon spent', 'Run directory:', 'Dashboard:',
                   'Model:'):
    assert expected in out
  assert 'Traceback' not in err
  # Export on request from the latest checkpoint replaces the previous export.
  exported = subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'export.py'), f'--run_dir={run_dir}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert 'Exported round 2' in exported.stdout
  assert (run_dir / 'saved_model' / 'saved_model.pb').exists()


@pytest.mark.parametrize('args, message', [
    ([*SMALL, 'stray'], 'Unexpected arguments: stray'),
    ([*SMALL, '--config.clients_per_round=1000'], 'clients_per_round must be at most'),
    ([*SMALL, '--config.policy=/nonexistent/policy.json'], 'policy file must exist'),
], ids=['stray_argument', 'contradictory_config', 'missing_policy'])
def test_user_mistakes_get_one_clear_message(tmp_path, args, message):
  child = _start([*args, '--experiment_name=bad'], tmp_path)
  out, err = child.communicate(timeout=300)
  assert child.returncode != 0
  assert message in out + err
  assert 'Traceback' not in out + err


def test_interrupt_leaves_nothing_and_says_how_to_resume(tmp_path):
  # Non-private: 50 DP rounds at 10 clients a round would be refused by calibration.
  child = _start([*SMALL, '--config.dp=false', '--config.total_rounds=50',
                  '--experiment_name=sigint'], tmp_path)
  run_dir = tmp_path / 'sigint'
  deadline = time.monotonic() + 400
  workers = set()
  while (not _metric_rounds(run_dir) and child.poll() is None and
         time.monotonic() < deadline):
    workers |= _worker_pids(_tree(child.pid))
    time.sleep(0.5)
  assert _metric_rounds(run_dir), 'no round finished in time'
  child.send_signal(signal.SIGINT)
  out, err = child.communicate(timeout=120)
  assert child.returncode != 0
  assert 'rerun the same command to resume' in err
  assert 'Traceback' not in err
  assert workers and _gone(workers)


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_exactly(tmp_path):
  args = [*SMALL, '--config.total_rounds=4', '--experiment_name=killed']
  run_dir = tmp_path / 'killed'
  child = _start(args, tmp_path)
  deadline = time.monotonic() + 600
  workers = set()
  while (len(_metric_rounds(run_dir)) < 2 and child.poll() is None and
         time.monotonic() < deadline):
    workers |= _worker_pids(_tree(child.pid))
    time.sleep(0.2)
  child.kill()
  child.communicate()
  assert workers and _gone(workers), 'worker survived kill -9 of its parent'
  rerun = _start(args, tmp_path)
  out, err = rerun.communicate(timeout=900)
  assert rerun.returncode == 0, err[-3000:]
  assert _metric_rounds(run_dir) == [1, 2, 3, 4]
  verified = audit_lib.verify_run_dir(str(run_dir))
  assert verified.ok and verified.records == 4, verified
  with open(run_dir / 'privacy_ledger.json') as f:
    assert json.load(f)['rounds_completed'] == 4


@pytest.mark.parametrize('args, message', [
    (['--config=configs/smoke.py', '--config.totl_rounds=3'],
     'FATAL Flags parsing error: --config.totl_rounds: the config has no field \'totl_rounds\'. '
     'Did you mean "total_rounds" instead of "totl_rounds"?'),
    (['--config=configs/smoke.py', '--config.model.bogus=1'],
     "FATAL Flags parsing error: --config.model.bogus: the config has no field 'bogus'."),
    (['--config=configs/nowhere.py'],
     'FATAL Flags parsing error: --config: no config file at configs/nowhere.py.'),
    (['--config=configs'],
     'FATAL Flags parsing error: --config: configs is a folder, not a config file.'),
], ids=['unknown_field', 'unknown_nested_field', 'missing_config_file', 'config_is_a_folder'])
def test_bad_config_flag_is_a_one_line_usage_error(tmp_path, args, message):
  child = _start([*args, '--experiment_name=bad'], tmp_path)
  _, err = child.communicate(timeout=120)
  assert child.returncode == 1
  lines = [line for line in err.splitlines() if 'tensorflow' not in line and line.strip()]
  assert lines[-2:] == [message, 'Pass --helpshort or --helpfull to see help on flags.']
  assert 'Traceback' not in err
  assert not (tmp_path / 'bad').exists()


def _policy_file(tmp_path, kind):
  with open(os.path.join(REPO, 'configs', 'privacy_policy.json'), 'rb') as f:
    seed = f.read()
  if kind == 'folder':
    return str(tmp_path)
  path = tmp_path / 'policy.json'
  if kind == 'latin1':
    path.write_bytes(seed.replace(b'Head CT', 'T\u00eate'.encode('latin-1')))
  else:
    path.write_bytes(seed.replace(b'"delta": 1e-5', b'"delta": 0.99'))
  return str(path)


@pytest.mark.parametrize('kind, message', [
    ('latin1', 'policy file must be UTF-8 JSON'),
    ('folder', 'policy file must be a regular file'),
    ('delta', 'delta must be a number in (0, 0.001]'),
], ids=['non_utf8_policy', 'policy_is_a_folder', 'delta_0.99'])
def test_bad_policy_file_is_one_clear_error_before_any_round(tmp_path, kind, message):
  policy = _policy_file(tmp_path, kind)
  child = _start([*SMALL, f'--config.policy={policy}', '--experiment_name=bad'], tmp_path)
  out, err = child.communicate(timeout=300)
  assert child.returncode != 0
  assert message in out + err
  assert 'Traceback' not in out + err
  assert not _metric_rounds(tmp_path / 'bad')
