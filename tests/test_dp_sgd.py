"""Example-level DP-SGD with per-category clip norms (privacy_unit 'example')."""

import json
import math
import os

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from tff_medical import categories
from tff_medical.errors import ConfigError
from tff_medical.errors import PolicyError
from tff_medical.models import cnn
from tff_medical.privacy import example_ledger
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.training import config as config_lib
from tff_medical.training import dp_sgd
from tff_medical.training import program

from helpers import reference_epsilon  # pylint: disable=g-bad-import-order
from helpers import smoke_config  # pylint: disable=g-bad-import-order

IDS = categories.CATEGORY_IDS
LOCAL_STEPS = 6
PLANNED_STEPS = 2 * LOCAL_STEPS
POLICY = policy_lib.load_policy(policy_lib.DEFAULT_POLICY_PATH)


def _model():
  return cnn.build_cnn((4,), seed=0)


def _data(counts, seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  x = rng.random((len(y), 64, 64, 1)).astype(np.float32)
  return x, y


@pytest.fixture(scope='module')
def plans():
  # Two sites of different sizes (q = 10/100 and 10/200): their epsilons differ.
  return {
      'client_0': dp_sgd.plan_site(POLICY, [20, 10, 20, 20, 20, 10], 10, PLANNED_STEPS, 1.0),
      'client_1': dp_sgd.plan_site(POLICY, [40, 20, 40, 40, 40, 20], 10, PLANNED_STEPS, 1.0),
  }


@pytest.fixture(scope='module')
def trainer():
  return dp_sgd.DPSGDTrainer(_model, learning_rate=0.1, local_steps=LOCAL_STEPS, noise_seed=0)


def _initial(trainer_):
  return [v.numpy() for v in trainer_.keras_model.trainable_variables]


def _new_ledger(plans_):
  return example_ledger.ExampleLevelLedger(
      POLICY, {s: example_ledger.SiteSpec(p.sampling, p.noise_multipliers)
               for s, p in plans_.items()}, LOCAL_STEPS)


class TestAccounting:

  def test_plan_is_the_scale_mechanism(self, plans):
    plan = plans['client_0']
    counts = np.array([plan.category_counts[c] for c in IDS], float)
    zs = np.array([plan.noise_multipliers[c] for c in IDS])
    assert plan.scale == pytest.approx(float(np.sum(counts * zs) / counts.sum()))
    clips = plan.clip_norms()
    for c in IDS:
      # Effective multiplier = noise stddev / clip norm = z_c.
      assert plan.noise_stddev / clips[c] == pytest.approx(plan.noise_multipliers[c], rel=1e-12)
    # Stricter budgets, more noise relative to the clip.
    assert plan.noise_multipliers['HeadCT'] > plan.noise_multipliers['AbdomenCT'] > (
        plan.noise_multipliers['CXR'])

  def test_epsilon_equals_independent_dp_accounting(self, plans, trainer):
    ledger = _new_ledger(plans)
    for round_num in range(2):
      outputs = {}
      for i, (site, plan) in enumerate(plans.items()):
        x, y = _data([plan.category_counts[c] for c in IDS], seed=i)
        outputs[site] = trainer.train(_initial(trainer), x, y, plan=plan,
                                      sampling_seed=(7, round_num, i))
        assert outputs[site].steps == LOCAL_STEPS
      ledger.record_round({s: o.dp_events for s, o in outputs.items()})
    worst = {}
    for site, plan in plans.items():
      for c in IDS:
        expected = reference_epsilon([(plan.rate, plan.noise_multipliers[c], 2 * LOCAL_STEPS)],
                                     POLICY.delta)
        # The applied multiplier is the float32 ratio the step used: ~1e-7 off the plan.
        assert ledger.site_epsilon(site, c) == pytest.approx(expected, rel=1e-5), (site, c)
        target = POLICY.budget(c).epsilon
        # Calibrated for exactly these steps: the budget is used, not exceeded.
        assert target * 0.99 < ledger.site_epsilon(site, c) <= target
        worst[c] = max(worst.get(c, 0.0), ledger.site_epsilon(site, c))
    for c in IDS:
      assert ledger.epsilon_spent(c) == worst[c]
    assert ledger.example_level_epsilon == max(worst.values())
    # Another round would exceed every budget at every site: all frozen.
    assert all(ledger.releasable(s) == () for s in plans)
    assert ledger.all_exhausted
    published = ledger.to_json_dict()
    ledger_lib.validate_ledger_json(published)  # Dispatches on privacy_unit.
    assert published['privacy_unit'] == 'example'
    assert published['whole_guarantee'] == 'worst_site'
    for c in IDS:
      assert published['categories'][c]['epsilon_spent'] == worst[c]
      for site, plan in plans.items():
        entry = published['sites'][site]['categories'][c]
        assert entry['steps_released'] == 2 * LOCAL_STEPS
        assert published['sites'][site]['sampling']['rate'] == plan.rate
    restored = example_ledger.ExampleLevelLedger.from_state(
        json.loads(json.dumps(ledger.state())), POLICY)
    assert restored.to_json_dict() == published


class TestMechanism:

  def test_clip_norms_realize_each_category_multiplier(self, plans, trainer):
    """Noise-free release of one example = its clipped gradient (norm C_c); noise std = s C."""
    plan = dataclasses_replace_clip(plans['client_0'], 1e-3)  # Every gradient exceeds its clip.
    weights = _initial(trainer)
    clips = plan.clip_norms()
    clip_vector = [clips[c] for c in IDS]
    x, y = _data([1] * 6, seed=3)
    contribution = {}
    for i, c in enumerate(IDS):
      release = trainer.release(weights, x[i:i + 1], y[i:i + 1], clip_vector, 0.0)
      contribution[c] = math.sqrt(sum(float(np.sum(r.astype(np.float64)**2)) for r in release))
      assert contribution[c] == pytest.approx(clips[c], rel=1e-4), c
    noiseless = trainer.release(weights, x, y, clip_vector, 0.0)
    draws = 300
    residuals = np.concatenate([
        np.concatenate([(r - r0).ravel() for r, r0 in zip(
            trainer.release(weights, x, y, clip_vector, plan.noise_stddev), noiseless)])
        for _ in range(draws)]).astype(np.float64)
    n = residuals.size
    sigma = plan.noise_stddev
    # Mean within 5 standard errors; variance within 5 standard errors of a chi-square.
    assert abs(residuals.mean()) < 5 * sigma / math.sqrt(n)
    measured = residuals.std()
    assert abs(measured**2 / sigma**2 - 1) < 5 * math.sqrt(2 / n), (measured, sigma)
    for c in IDS:
      assert measured / contribution[c] == pytest.approx(plan.noise_multipliers[c],
                                                         rel=6 * math.sqrt(2 / n)), c

  def test_zero_noise_without_clipping_is_plain_sgd(self, trainer):
    x, y = _data([3, 2, 3, 1, 2, 1], seed=5)
    weights = _initial(trainer)
    stepped = trainer.step(weights, x, y, [math.inf] * 6, 0.0, expected_batch_size=len(y))
    model = _model()
    model.set_weights(weights)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    for new, old, g in zip(stepped, weights, gradients):
      # float32 sums in another order: equal to ~1e-6 of the update's scale.
      step = 0.1 * g.numpy()
      np.testing.assert_allclose(old - new, step, rtol=1e-4, atol=1e-5 * np.abs(step).max())
    assert any(not np.allclose(new, old) for new, old in zip(stepped, weights))

  def test_empty_poisson_batch_releases_noise_only(self, trainer):
    weights = _initial(trainer)
    x, y = _data([0] * 6)
    unchanged = trainer.step(weights, x, y, [1.0] * 6, 0.0, 10)
    for new, old in zip(unchanged, weights):
      np.testing.assert_array_equal(new, old)
    noised = trainer.step(weights, x, y, [1.0] * 6, 1.0, 10)
    assert all(not np.array_equal(new, old) for new, old in zip(noised, weights))

  def test_frozen_category_contributes_nothing_and_reports_no_event(self, plans, trainer):
    plan = plans['client_0']
    released = tuple(c for c in IDS if c != 'HeadCT')
    clips = plan.clip_norms(released)
    assert clips['HeadCT'] == 0.0
    weights = _initial(trainer)
    x, y = _data([5, 0, 0, 0, 0, 0], seed=2)
    stepped = trainer.step(weights, x, y, [clips[c] for c in IDS], 0.0, 10)
    for new, old in zip(stepped, weights):
      np.testing.assert_array_equal(new, old)
    x, y = _data([plan.category_counts[c] for c in IDS])
    output = trainer.train(weights, x, y, plan=plan, released=released, sampling_seed=1)
    assert output.dp_events['HeadCT'] is None
    assert all(output.dp_events[c] is not None for c in released)

  def test_poisson_batches_follow_the_rate(self, plans, trainer):
    plan = plans['client_1']
    x, y = _data([plan.category_counts[c] for c in IDS])
    sizes = []
    for seed in range(4):
      sizes += trainer.train(_initial(trainer), x, y, plan=plan, sampling_seed=seed).batch_sizes
    # 24 Binomial(200, 0.05) draws: mean 10, stddev of the mean ~0.63.
    assert abs(np.mean(sizes) - 10) < 5 * math.sqrt(200 * 0.05 * 0.95 / len(sizes))
    assert len(set(sizes)) > 1  # Poisson, not a fixed batch.


def dataclasses_replace_clip(plan, clip):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(plan, l2_norm_clip=clip)


class TestBudget:

  def test_freeze_per_category(self, plans, trainer):
    ledger = _new_ledger({'client_0': plans['client_0']})
    plan = plans['client_0']
    x, y = _data([plan.category_counts[c] for c in IDS])
    first = trainer.train(_initial(trainer), x, y, plan=plan, sampling_seed=1)
    ledger.record_round({'client_0': first.dp_events})
    # Round 2 trains HeadCT only: it reaches its planned steps, the others are halfway.
    second = trainer.train(_initial(trainer), x, y, plan=plan, released=('HeadCT',),
                           sampling_seed=2)
    ledger.record_round({'client_0': second.dp_events})
    assert ledger.releasable('client_0') == tuple(c for c in IDS if c != 'HeadCT')
    assert ledger.site_status('client_0', 'HeadCT') == 'exhausted'
    with pytest.raises(PolicyError, match='exhausted'):
      ledger.record_round({'client_0': first.dp_events})
    published = ledger.to_json_dict()
    assert published['categories']['HeadCT']['status'] == 'exhausted'
    assert published['categories']['CXR']['status'] == 'active'
    # A failed round recorded nothing.
    assert ledger.rounds_completed == 2

  def test_event_over_budget_is_refused(self, plans):
    ledger = _new_ledger({'client_0': plans['client_0']})
    plan = plans['client_0']
    too_little_noise = {c: dp_sgd.step_event(plan.noise_multipliers[c] / 3, plan.rate,
                                             LOCAL_STEPS) for c in IDS}
    with pytest.raises(PolicyError, match='must keep epsilon within'):
      ledger.record_round({'client_0': too_little_noise})
    assert ledger.rounds_completed == 0


class TestRefusals:

  @pytest.mark.parametrize('field,value,match', [
      ('privacy_unit', 'patient', 'privacy_unit must be one of client, example'),
      ('dp', False, 'dp must be true with privacy_unit'),
      ('example_dp.l2_norm_clip', 0.0, 'example_dp.l2_norm_clip must be positive'),
      ('example_dp.local_steps', 0, 'example_dp.local_steps must be a positive integer'),
      ('example_dp.l2_norm_clip', math.inf, 'example_dp.l2_norm_clip must be positive'),
  ])
  def test_config(self, field, value, match):
    overrides = {'privacy_unit': 'example'}
    overrides[field] = value
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(smoke_config(**overrides))

  def test_default_is_client(self):
    assert config_lib.base_config().privacy_unit == 'client'

  def test_batch_larger_than_site(self):
    with pytest.raises(PolicyError, match='expected_batch_size must be at most'):
      dp_sgd.plan_site(POLICY, [1] * 6, 10, 5, 1.0)

  def test_bad_clip_and_steps(self):
    with pytest.raises(PolicyError, match='l2_norm_clip must be positive'):
      dp_sgd.plan_site(POLICY, [10] * 6, 5, 5, -1.0)
    with pytest.raises(PolicyError, match='planned_steps must be a positive integer'):
      dp_sgd.plan_site(POLICY, [10] * 6, 5, 0, 1.0)

  def test_ledger_refuses_wrong_rate_and_shape(self, plans):
    ledger = _new_ledger({'client_0': plans['client_0']})
    plan = plans['client_0']
    wrong_rate = {c: dp_sgd.step_event(plan.noise_multipliers[c], plan.rate / 2, LOCAL_STEPS)
                  for c in IDS}
    with pytest.raises(PolicyError, match='sampling probability must be'):
      ledger.record_round({'client_0': wrong_rate})
    with pytest.raises(PolicyError, match='SelfComposedDpEvent'):
      ledger.record_round({'client_0': {'HeadCT': dp_accounting.GaussianDpEvent(5.0)}})
    with pytest.raises(PolicyError, match='site must be one of'):
      ledger.record_round({'client_9': {}})

  def test_tampered_ledger_json(self, plans):
    published = _new_ledger(plans).to_json_dict()
    published['sites']['client_0']['categories']['CXR']['epsilon_spent'] = 0.3
    published['sites']['client_0']['categories']['CXR']['steps_released'] = 6
    with pytest.raises(PolicyError, match='worst site'):
      ledger_lib.validate_ledger_json(published)


def _policy_file(tmp_path, factor):
  path = tmp_path / 'policy.json'
  path.write_text(json.dumps(POLICY.scaled(factor).to_json_dict()))
  return str(path)


@pytest.mark.usefixtures('tff_context')
@pytest.mark.parametrize('stack', [
    pytest.param(False, id='example_only'),
    pytest.param(True, id='stacked_client_level', marks=pytest.mark.slow),
])
def test_program_run_writes_an_example_ledger(tmp_path, stack):
  overrides = {'privacy_unit': 'example', 'num_clients': 3, 'clients_per_round': 3,
               'total_rounds': 2, 'eval_every': 2, 'client.batch_size': 16,
               'example_dp.local_steps': 3}
  if stack:
    # Client-level noise on 3 sites needs large budgets: the point of example level.
    overrides.update({'example_dp.stack_client_level': True,
                      'policy': _policy_file(tmp_path, 16.0),
                      'clip.max_value_noise_inflation': 10.0})
  run_dir = str(tmp_path / 'run')
  if not stack:
    # Interrupted after one round and resumed: the ledger continues, it does not restart.
    first = program.run(smoke_config(**overrides), run_dir, stop_after_rounds=1)
    assert first.rounds_completed == 1
  result = program.run(smoke_config(**overrides), run_dir)
  assert result.rounds_completed == 2
  with open(os.path.join(run_dir, ledger_lib.LEDGER_FILENAME)) as f:
    published = json.load(f)
  ledger_lib.validate_ledger_json(published)
  assert published['privacy_unit'] == 'example'
  assert published['rounds_completed'] == 2
  assert len(published['sites']) == 3
  for site in published['sites'].values():
    for c in IDS:
      entry = site['categories'][c]
      expected = reference_epsilon(
          [(site['sampling']['rate'], entry['noise_multiplier'], entry['steps_released'])],
          published['delta'])
      assert entry['epsilon_spent'] == pytest.approx(expected, rel=1e-9)
      assert entry['steps_released'] == 6
  client_path = os.path.join(run_dir, example_ledger.CLIENT_LEDGER_FILENAME)
  assert os.path.exists(client_path) == stack
  if stack:
    with open(client_path) as f:
      client = json.load(f)
    ledger_lib.validate_ledger_json(client)
    assert client['privacy_unit'] == 'client' and client['rounds_completed'] == 2
    assert published['client_level_epsilon'] == client['client_level_epsilon']
  else:
    assert published['client_level_epsilon'] is None
  # The dashboard's compliance panel recomputes every site's figures on its own, and notices an
  # edited one.
  from tff_medical.monitoring import dashboard  # pylint: disable=g-import-not-at-top
  assert dashboard.check_ledger(published).ok, dashboard.check_ledger(published).reason
  tampered = json.loads(json.dumps(published))
  site = sorted(tampered['sites'])[0]
  tampered['sites'][site]['categories']['HeadCT']['epsilon_spent'] *= 0.5
  check = dashboard.check_ledger(tampered)
  assert not check.ok and f'{site} HeadCT' in check.reason, check.reason
  # The end-of-run table and the model card name the unit that was protected.
  from tff_medical.export import saved_model  # pylint: disable=g-import-not-at-top
  from tff_medical.training import report  # pylint: disable=g-import-not-at-top
  table = report.summary_table(result)
  assert ('example level, worst site' in table) == (not stack), table
  card = saved_model.build_model_card(result.policy, published)
  assert card['privacy']['guarantee'].startswith('example-level'), card['privacy']
  assert card['privacy']['example_level_epsilon'] == published['example_level_epsilon']
