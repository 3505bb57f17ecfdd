"""The benchmark's harness on tiny settings: structure, equal work, reports; no timings."""

import json
import os
import subprocess
import sys
from xml.etree import ElementTree

import pytest

from tff_medical import categories
from tff_medical.benchmarks import modes
from tff_medical.benchmarks import plot
from tff_medical.benchmarks import report
from tff_medical.benchmarks import round_time
from tff_medical.benchmarks import scaling
from tff_medical.privacy import policy as policy_lib

from helpers import load_config  # pylint: disable=g-bad-import-order
from helpers import REPO  # pylint: disable=g-bad-import-order

# 2 clients x 4 examples; TFF's dp_aggregator needs noise < 2 x 0.05 x clients = 0.2 here.
TINY = round_time.Setting('tiny', num_clients=2, examples_per_client=4, conv_filters=(4,),
                          noise_multiplier=0.1)


@pytest.fixture(scope='module')
def results(tff_context):
  del tff_context
  return round_time.run_benchmark([TINY], timed_rounds=1)


@pytest.mark.slow  # End-to-end tier: runs the benchmark itself.
def test_every_contender_trained_the_same_examples(results):
  (setting,) = results['settings']
  contenders = setting['contenders']
  assert list(contenders) == [c.value for c in round_time.Contender]
  for name, entry in contenders.items():
    assert entry['examples_per_round'] == [TINY.num_examples], name


@pytest.mark.slow  # End-to-end tier: runs the benchmark itself.
def test_results_structure(results):
  (setting,) = results['settings']
  assert setting['setting']['num_clients'] == 2
  assert setting['timed_rounds'] == 1
  for name, entry in setting['contenders'].items():
    assert len(entry['round_seconds']) == 1, name
    assert entry['median_seconds'] > 0, name
    assert entry['examples_per_second'] > 0, name
    assert set(entry) >= {'ratio_to_keras', 'ratio_to_tff_dp', 'local_steps_per_round',
                          'warmup_seconds', 'median_phase_seconds'}, name
  contenders = setting['contenders']
  assert contenders['keras']['ratio_to_keras'] == 1.0
  assert contenders['tff_dp']['ratio_to_tff_dp'] == 1.0
  assert set(contenders['class_aware_dp']['median_phase_seconds']) == {
      'local_training', 'tff_aggregation_and_server'}
  assert set(setting['targets']) == {'class_aware_dp_vs_tff_dp', 'class_aware_dp_vs_keras'}
  assert {'cpu_model', 'cpu_count', 'tensorflow', 'tensorflow_federated',
          'gpu_used'} <= set(results['machine'])
  json.dumps(results)  # The script writes it as JSON.


def test_local_steps_count_per_category_batches():
  clients = round_time.make_clients(TINY)
  labels = [c.labels for c in clients]
  # Batch 32 > 4 examples: one step a client for TFF, one per category present for ours.
  assert round_time.local_steps(round_time.Contender.KERAS, clients, TINY) == 1
  assert round_time.local_steps(round_time.Contender.TFF_DP, clients, TINY) == 2
  assert round_time.local_steps(round_time.Contender.CLASS_AWARE_DP, clients, TINY) == sum(
      len(set(y.tolist())) for y in labels)


@pytest.mark.slow  # End-to-end tier: runs the benchmark itself.
def test_markdown_names_machine_command_settings_and_targets(results):
  text = report.render_markdown(results, 'python experiments/bench.py --quick')
  for expected in ('## Machine', 'python experiments/bench.py --quick', '## tiny',
                   '## Targets', '## Reading', results['machine']['cpu_model'],
                   '`class_aware_dp`', 'Load average'):
    assert expected in text, expected


def test_setting_refuses_bad_values():
  with pytest.raises(ValueError, match='num_clients must be a positive integer. Found 0.'):
    round_time.Setting('bad', num_clients=0, examples_per_client=4)
  with pytest.raises(ValueError, match='noise_multiplier must be positive'):
    round_time.Setting('bad', num_clients=2, examples_per_client=4, noise_multiplier=0.0)


@pytest.mark.slow  # End-to-end tier: runs the benchmark itself.
def test_one_tiny_scaling_point_measures_time_and_memory(tff_context, tmp_path):
  del tff_context
  config = load_config('demo')
  cache = scaling.make_image_cache(24, config, str(tmp_path))
  assert cache['num_images'] == 24 and cache['generate_seconds'] > 0
  point = scaling.ScalingPoint(total_clients=20, clients_per_round=10, timed_rounds=2,
                               warmup_rounds=0)
  result = scaling.measure_point(point, config, str(tmp_path))
  assert result['point'] == point.to_json_dict()
  assert set(result['setup_seconds']) == {'data_load', 'partition_and_sampler', 'build_process'}
  assert all(v >= 0 for v in result['setup_seconds'].values())
  assert len(result['rounds']) == 2 and result['warmup_seconds'] == []
  for r in result['rounds']:
    # One image a client: the examples trained are the clients sampled (Poisson: 0 to 20).
    assert r['examples'] == r['clients'] and 0 <= r['clients'] <= 20
    assert set(r['phases']) == {'sampling', 'local_training', 'tff_aggregation_and_server'}
    assert r['seconds'] >= sum(r['phases'].values()) > 0
  assert result['median_round_seconds'] > 0
  assert result['model_parameters'] == 3158  # configs/demo.py's model.
  memory = result['memory_mib']
  # TensorFlow alone holds hundreds of MiB; a peak is never below a later current value.
  assert 100 < memory['rss_at_start'] <= memory['python_peak']
  assert memory['rss_after_setup'] <= memory['python_peak'] < 64 * 1024
  assert 10 < memory['tff_worker_peak'] < 64 * 1024
  json.dumps(result)


def test_image_cache_prefix_is_the_generated_images(tmp_path):
  config = load_config('demo')
  scaling.make_image_cache(12, config, str(tmp_path))
  images, labels = scaling._load_images(str(tmp_path), 7)  # pylint: disable=protected-access
  full = (tmp_path / scaling.IMAGES_FILE, tmp_path / scaling.LABELS_FILE)
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert (images == np.load(full[0])[:7]).all() and (labels == np.load(full[1])[:7]).all()
  with pytest.raises(ValueError, match='at least 13 rows'):
    scaling._load_images(str(tmp_path), 13)  # pylint: disable=protected-access


def test_plans_share_points_and_reach_the_mednist_size():
  full = modes.MODES[modes.Mode.FULL].scaling_plan
  keys = [p.key for p in full.points()]
  assert sorted(keys) == sorted({'N=8100,m=10', 'N=8100,m=100', 'N=8100,m=1000',
                                 'N=1000,m=100', 'N=59000,m=100'})
  assert full.max_total == 59000
  quick = modes.MODES[modes.Mode.QUICK].scaling_plan
  assert quick.max_total <= 10000 and max(p.clients_per_round for p in quick.points()) <= 100
  with pytest.raises(ValueError, match='clients_per_round must be at most total_clients'):
    scaling.ScalingPoint(total_clients=10, clients_per_round=11)


def _point(n, m, seconds, examples, sampling=0.001, rss=700.0, peak=1000.0, worker=250.0):
  rounds = [{'seconds': s, 'clients': examples, 'examples': examples,
             'phases': {'sampling': sampling, 'local_training': s / 3,
                        'tff_aggregation_and_server': 2 * s / 3}} for s in seconds]
  median = sorted(seconds)[len(seconds) // 2]
  return {
      'point': scaling.ScalingPoint(n, m, timed_rounds=len(seconds)).to_json_dict(),
      'model_parameters': 3158,
      'setup_seconds': {'data_load': n / 1e5, 'partition_and_sampler': n / 1e6,
                        'build_process': 7.5},
      'warmup_seconds': [12.5], 'rounds': rounds, 'median_round_seconds': median,
      'median_phase_seconds': {'sampling': sampling, 'local_training': median / 3,
                               'tff_aggregation_and_server': 2 * median / 3},
      'mean_clients_per_round': examples, 'mean_examples_per_round': examples,
      'seconds_per_1000_examples': 1000 * sum(seconds) / (examples * len(seconds)),
      'memory_mib': {'rss_at_start': 600.0, 'rss_after_setup': rss, 'python_peak': peak,
                     'tff_worker_peak': worker},
  }


def _scaling_results(large_n_seconds):
  plan = scaling.ScalingPlan(fixed_total=1000, clients_per_round=(10, 100),
                             fixed_clients_per_round=10, totals=(1000, 59000), timed_rounds=3)
  points = {
      'N=1000,m=10': _point(1000, 10, [0.9, 1.0, 1.1], 10),
      'N=1000,m=100': _point(1000, 100, [2.4, 2.5, 2.6], 100, peak=1100.0, worker=300.0),
      'N=59000,m=10': _point(59000, 10, large_n_seconds, 10, sampling=0.0004, rss=930.0,
                             peak=1250.0),
  }
  return {
      'plan': plan.to_json_dict(),
      'config': {'model': {'conv_filters': [8], 'input_pooling': 4, 'head': 'flatten'},
                 'client': {'batch_size': 16, 'learning_rate': 0.2},
                 'server': {'optimizer': 'adam', 'learning_rate': 0.02},
                 'sampling': 'poisson', 'partition': 'iid', 'seed': 0},
      'image_cache': {'num_images': 59004, 'generate_seconds': 81.25},
      'points': points,
      'by_clients_per_round': {'points': ['N=1000,m=10', 'N=1000,m=100'], 'x': [10, 100],
                               'median_round_seconds': [1.0, 2.5]},
      'by_total_clients': {'points': ['N=1000,m=10', 'N=59000,m=10'], 'x': [1000, 59000],
                           'median_round_seconds': [1.0, sorted(large_n_seconds)[1]]},
      'load_average_start': (1.0, 1.5, 2.0), 'load_average_end': (2.0, 1.5, 1.0),
      'wall_seconds': 321.0,
  }


@pytest.mark.slow  # End-to-end tier: runs the benchmark itself.
def test_markdown_renders_the_scaling_tables(results):
  page = report.render_markdown(dict(results, scaling=_scaling_results([1.0, 1.05, 1.1]),
                                     flags={'mode': 'full'}),
                                'python experiments/bench.py --mode=full', 'scaling.svg')
  for expected in (
      '## Scaling', '### Against clients per round (N = 1,000 clients)',
      '### Against total clients (10 clients per round, expected)',
      '![Round time and peak memory against clients per round and total clients](scaling.svg)',
      # m = 100 row: sampled, examples, median, local, aggregation, sampling ms, s/1000, warm-up,
      # RSS after setup, Python peak, worker peak.
      '| 100 | 100.0 | 100.0 | 2.500 | 0.833 | 1.667 | 1.0 | 25.00 | 12.5 | 700 | 1100 | 300 |',
      # N = 59,000 row: data load, partition, build first.
      '| 59,000 | 0.59 | 0.06 | 7.5 | 10.0 | 10.0 | 1.050 |',
      '59,004 phantoms, generated once for the run in 81.2 s',
      'went from 100.00 s to 105.00 s (1.05x), within the spread',
      'took 1.0 ms and 0.4 ms', '700 to 930 MiB',
      # (1100 - 1000) / 90 and (300 - 250) / 90 MiB per client; 6 x 3158 x 4 B = 74 KiB.
      'about 1.11 and 0.56 MiB more per client sampled, against the 6 x 3,158 float32 (74 KiB)',
      'or `make bench-full` (this page is from the full mode; `make bench` (quick mode) runs the '
      'other).'):
    assert expected in page, expected


@pytest.mark.slow  # End-to-end tier: runs the benchmark itself.
def test_scaling_reading_says_when_cost_grows_with_idle_clients(results):
  # 2x slower at 59x the clients, with rounds within 10% of each other: beyond the noise.
  page = report.render_markdown(dict(results, scaling=_scaling_results([1.95, 2.0, 2.05])),
                                'cmd')
  assert '(2.00x), beyond the spread of the rounds within one point (up to 20%' in page


def test_scaling_svg_has_a_marker_per_point_and_panel():
  svg = plot.scaling_svg(_scaling_results([1.0, 1.05, 1.1]))
  root = ElementTree.fromstring(svg)
  circles = root.findall('{http://www.w3.org/2000/svg}circle')
  # 2 columns x 2 points; time panels 3 series, memory panels 2: (3 + 2) x 2 x 2, plus one
  # legend marker a series: (3 + 2) x 2.
  assert len(circles) == 30
  boxes = [tuple(float(r.get(k)) for k in ('x', 'y', 'width', 'height'))
           for r in root.findall('{http://www.w3.org/2000/svg}rect') if r.get('x')]
  assert len(boxes) == 4
  markers = [(float(c.get('cx')), float(c.get('cy'))) for c in circles]
  inside = [any(x <= cx <= x + w and y <= cy <= y + h for x, y, w, h in boxes)
            for cx, cy in markers]
  assert sum(inside) == 20  # Every data marker lies in its chart; legend markers below.
  texts = [t.text for t in root.iter('{http://www.w3.org/2000/svg}text')]
  assert 'Round time, N = 1,000 clients' in texts and '59k' in texts


@pytest.mark.slow  # End-to-end tier: the entry point in a fresh interpreter.
def test_bench_script_refuses_a_bad_mode_without_traceback():
  done = subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'bench.py'),
                         '--mode=bad'],
                        capture_output=True, text=True, timeout=120, cwd=REPO,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert done.returncode != 0
  assert 'flag --mode=bad: value should be one of <quick|full>' in done.stderr
  assert 'Traceback' not in done.stderr
  assert sorted(m.value for m in modes.Mode) == ['full', 'quick']


def _example_level_figures(client_level):
  final = lambda base: dict({'accuracy': base}, **{
      f'accuracy/{c}': base + 0.01 * i for i, c in enumerate(categories.CATEGORY_IDS)})
  return {
      'config': {'num_clients': 5, 'dataset': 'phantoms', 'num_per_category': 10000,
                 'total_rounds': 60},
      'command': 'python experiments/example_level_bench.py --config.total_rounds=60\n',
      'date_utc': '2026-11-28T04:54:42Z', 'seconds': 1977.0,
      'ledger': {'categories': {c: {'target_epsilon': policy_lib.default_policy().budget(
          c).epsilon} for c in categories.CATEGORY_IDS}},
      'results': {'example': {'final': final(0.5)}, 'non_private': {'final': final(0.9)}},
      'client_level': client_level,
  }


@pytest.mark.slow  # End-to-end tier: runs the benchmark itself.
def test_markdown_shows_example_level_accuracy_per_category(results):
  refused = {'status': 'refused', 'message': 'Use at least 1948 clients per round.'}
  page = report.render_markdown(results, 'cmd', None, _example_level_figures(refused))
  assert '| Head CT | 0.5 | 50.0 | refused | 90.0 |' in page
  assert '| Hand X-ray | 2 | 55.0 | refused | 95.0 |' in page
  assert '| all |  | 50.0 | refused | 90.0 |' in page
  assert '"Use at least 1948 clients per round."' in page
  assert '`python experiments/example_level_bench.py --config.total_rounds=60`' in page
  trained = {'status': 'trained', 'final': dict(
      {'accuracy': 0.25}, **{f'accuracy/{c}': 0.25 for c in categories.CATEGORY_IDS})}
  page = report.render_markdown(results, 'cmd', None, _example_level_figures(trained))
  assert '| Abdomen CT | 1 | 52.0 | 25.0 | 92.0 |' in page
  assert 'refused' not in page.split('## Accuracy per category at a few sites')[1]
  page = report.render_markdown(results, 'cmd', None, _example_level_figures(
      {'status': 'calibrated', 'noise_multipliers': {}}))
  assert '| CXR (X-ray) | 2 | 54.0 | not run | 94.0 |' in page
  assert '## Accuracy per category at a few sites' not in report.render_markdown(
      results, 'cmd')
