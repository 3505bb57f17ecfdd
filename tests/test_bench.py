"""The round-time benchmark's harness on a tiny setting: structure and equal work, no timings."""

import json

import pytest

from tff_medical.benchmarks import report
from tff_medical.benchmarks import round_time

# 2 clients x 4 examples; TFF's dp_aggregator needs noise < 2 x 0.05 x clients = 0.2 here.
TINY = round_time.Setting('tiny', num_clients=2, examples_per_client=4, conv_filters=(4,),
                          noise_multiplier=0.1)


@pytest.fixture(scope='module')
def results(tff_context):
  del tff_context
  return round_time.run_benchmark([TINY], timed_rounds=1)


def test_every_contender_trained_the_same_examples(results):
  (setting,) = results['settings']
  contenders = setting['contenders']
  assert list(contenders) == [c.value for c in round_time.Contender]
  for name, entry in contenders.items():
    assert entry['examples_per_round'] == [TINY.num_examples], name


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
