"""SavedModel export: serves in a fresh process with TensorFlow alone and agrees with Keras; the
model card carries the ledger's guarantee per category and refuses what it must not hold."""

import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from tff_medical import categories
from tff_medical.errors import TffMedicalError
from tff_medical.export import saved_model
from tff_medical.models import cnn
from tff_medical.monitoring import audit
from tff_medical.privacy import accounting
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling

from helpers import random_weights_cnn  # pylint: disable=g-bad-import-order

_ACCURACY = {'HeadCT': 0.91, 'BreastMRI': 0.88, 'AbdomenCT': 0.8, 'ChestCT': 0.75, 'CXR': 0.97}


@pytest.fixture(scope='module')
def policy():
  return policy_lib.default_policy()


@pytest.fixture(scope='module')
def ledger_json(policy):
  """A real ledger after 3 rounds (HeadCT not released in round 3), as published."""
  ledger = ledger_lib.PrivacyLedger(
      policy, {c: 4.0 for c in categories.CATEGORY_IDS},
      sampling.SamplingSpec(method='poisson', total_clients=1000,
                            expected_clients_per_round=20))
  for round_num in range(3):
    ledger.record_round({
        c: dp_accounting.GaussianDpEvent(4.0)
        for c in categories.CATEGORY_IDS if not (c == 'HeadCT' and round_num == 2)
    })
  return ledger.to_json_dict()


@pytest.fixture(scope='module')
def model():
  # Drawn so that the images below win four different categories.
  return random_weights_cnn()


@pytest.fixture(scope='module')
def images():
  """Flat levels, a ramp, checkerboards of several periods and noise: (18, 64, 64, 1) uint8."""
  batch = [np.full((64, 64, 1), level, np.uint8) for level in range(0, 256, 32)]
  ramp = np.linspace(0, 255, 64)
  batch.append(np.tile(ramp[None, :, None], (64, 1, 1)).astype(np.uint8))
  for period in (1, 2, 4, 8, 16):
    board = (np.indices((64, 64)) // period).sum(0) % 2 * 255
    batch.append(board.astype(np.uint8)[..., None])
  batch += list(np.random.default_rng(11).integers(0, 256, (4, 64, 64, 1), dtype=np.uint8))
  return np.stack(batch)


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory, model, policy, ledger_json):
  directory = tmp_path_factory.mktemp('export') / 'model'
  saved_model.export_saved_model(
      model, directory, policy, ledger_json,
      model_card_extra={'data_source': 'MedNIST', 'accuracy_per_category': _ACCURACY})
  return str(directory)


_FRESH_PROCESS = textwrap.dedent('''
    import importlib.abc, sys

    class _NoTffMedical(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'tff_medical':
          raise ImportError('the exported model must not need tff_medical')
        return None

    sys.meta_path.insert(0, _NoTffMedical())
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(sys.argv[1])
    serve = loaded.signatures['serving_default']
    outputs = serve(images=tf.constant(np.load(sys.argv[2])))
    np.savez(sys.argv[3], **{k: v.numpy() for k, v in outputs.items()},
             dtypes=np.array([f'{k}={v.dtype.name}' for k, v in outputs.items()]))
    assert not any(m.startswith('tff_medical') for m in sys.modules)
''')


class TestServing:

  def test_fresh_process_with_tensorflow_alone_agrees_with_keras(self, tmp_path, export_dir,
                                                                 model, images):
    np.save(tmp_path / 'images.npy', images)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['TF_CPP_MIN_LOG_LEVEL'] = '2'
    done = subprocess.run(
        [sys.executable, '-c', _FRESH_PROCESS, export_dir, str(tmp_path / 'images.npy'),
         str(tmp_path / 'out.npz')],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(tmp_path / 'out.npz', allow_pickle=True)

    expected = model.predict(images.astype(np.float32) / 255.0, verbose=0)
    np.testing.assert_allclose(out['probabilities'], expected, atol=1e-5)
    np.testing.assert_array_equal(out['category_index'], expected.argmax(-1))
    np.testing.assert_allclose(out['probability'], expected.max(-1), atol=1e-5)
    assert sorted(out['dtypes']) == [
        'category_id=string', 'category_index=int32', 'display_name=string',
        'privacy_level=string', 'probabilities=float32', 'probability=float32']

  def test_signature_names_dtypes_and_shapes(self, export_dir):
    serve = tf.saved_model.load(export_dir).signatures[saved_model.SIGNATURE_KEY]
    _, inputs = serve.structured_input_signature
    assert inputs == {'images': tf.TensorSpec([None, 64, 64, 1], tf.uint8, name='images')}
    specs = serve.structured_outputs
    assert {k: (v.dtype, v.shape.as_list()) for k, v in specs.items()} == {
        'probabilities': (tf.float32, [None, 6]),
        'category_index': (tf.int32, [None]),
        'category_id': (tf.string, [None]),
        'display_name': (tf.string, [None]),
        'privacy_level': (tf.string, [None]),
        'probability': (tf.float32, [None]),
    }
    assert set(specs) == set(saved_model.OUTPUT_KEYS)

  def test_category_strings_match_argmax(self, export_dir, images, policy):
    serve = tf.saved_model.load(export_dir).signatures[saved_model.SIGNATURE_KEY]
    out = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
    assert out['probabilities'].shape == (len(images), 6)
    np.testing.assert_allclose(out['probabilities'].sum(-1), 1.0, atol=1e-5)
    winners = out['probabilities'].argmax(-1)
    assert len(set(winners)) >= 3  # Otherwise this would check few rows of the tables.
    for i, index in enumerate(winners):
      budget = policy.budgets[index]
      assert out['category_index'][i] == index
      assert out['category_id'][i].decode() == categories.CATEGORY_IDS[index] == budget.id
      assert out['display_name'][i].decode() == budget.display_name
      assert out['privacy_level'][i].decode() == budget.privacy_level.value

  def test_empty_batch(self, export_dir):
    serve = tf.saved_model.load(export_dir).signatures[saved_model.SIGNATURE_KEY]
    out = serve(images=tf.zeros([0, 64, 64, 1], tf.uint8))
    assert out['probabilities'].shape == (0, 6) and out['category_id'].shape == (0,)


class TestModelCard:

  def test_card_in_export_matches_ledger(self, export_dir, ledger_json, model, policy):
    with open(os.path.join(export_dir, saved_model.MODEL_CARD_FILENAME)) as f:
      card = json.load(f)
    assert card['data_source'] == 'MedNIST'
    assert card['rounds'] == 3
    assert card['accuracy_per_category'] == dict(_ACCURACY, Hand=None)
    details = card['model_details']
    assert details['model_sha256'] == audit.model_weights_sha256(model.get_weights())
    # Filled from the exported model itself.
    assert details['num_parameters'] == model.count_params()
    assert details['architecture'].count('Conv2D(') == 2 and 'Dense(6, softmax)' in (
        details['architecture'])
    assert details['version'] == 'round 3' and details['framework'].startswith('TensorFlow ')
    assert [c['id'] for c in card['categories']] == list(categories.CATEGORY_IDS)
    privacy = card['privacy']
    assert privacy['client_level_epsilon'] == ledger_json['client_level_epsilon']
    for c in categories.CATEGORY_IDS:
      entry, source = privacy['categories'][c], ledger_json['categories'][c]
      assert entry['target_epsilon'] == source['target_epsilon'] == policy.budget(c).epsilon
      assert entry['epsilon_spent'] == source['epsilon_spent']
      assert entry['noise_multiplier'] == source['noise_multiplier']
      assert entry['rounds_released'] == source['rounds_released']
      assert entry['delta'] == ledger_json['delta'] == 1e-5
      assert entry['accountant'] == 'rdp'
      assert entry['privacy_unit'] == 'client'
      assert entry['client_level_epsilon'] == ledger_json['client_level_epsilon']
      assert source['display_name'] in entry['statement']
    assert privacy['categories']['HeadCT']['rounds_released'] == 2
    assert privacy['categories']['CXR']['rounds_released'] == 3
    assert 0 < privacy['categories']['HeadCT']['epsilon_spent'] < (
        privacy['categories']['CXR']['epsilon_spent'])

  def test_write_model_card_from_ledger_file_into_run_dir(self, tmp_path, policy, ledger_json):
    with open(tmp_path / 'privacy_ledger.json', 'w') as f:
      json.dump(ledger_json, f)
    card = saved_model.write_model_card(
        tmp_path, policy, tmp_path / 'privacy_ledger.json', data_source='MedNIST',
        accuracy_per_category=_ACCURACY)
    with open(tmp_path / 'model_card.json') as f:
      assert json.load(f) == card
    assert card['rounds'] == 3

  def test_without_ledger_no_guarantee_is_claimed(self, tmp_path, policy):
    card = saved_model.write_model_card(tmp_path / 'card.json', policy, rounds=5)
    assert card['privacy']['guarantee'] == (
        'none claimed: no privacy ledger was supplied at export')
    assert 'categories' not in card['privacy'] and 'statement' not in card['privacy']
    assert card['rounds'] == 5
    # Nothing said about the data: the card does not guess.
    assert card['synthetic_training_data'] is None
    assert card['training_data']['description'] == 'not stated at export'

  def test_no_identifier_reaches_the_card(self, export_dir):
    with open(os.path.join(export_dir, saved_model.MODEL_CARD_FILENAME)) as f:
      text = f.read()
    # The prose may speak of patients (intended use); no field names one, no client id appears.
    for word in ('client_0', 'PatientName', 'PatientID', 'doe_john'):
      assert word not in text

    def keys(value):
      if isinstance(value, dict):
        for key, item in value.items():
          yield key
          yield from keys(item)
      elif isinstance(value, list):
        for item in value:
          yield from keys(item)

    found = list(keys(json.loads(text)))
    assert len(found) > 50  # The walk reached the nested sections.
    assert not [k for k in found if 'patient' in k.lower() or k.startswith('client_0')]

  @pytest.mark.parametrize('kwargs, message', [
      (dict(data_source='/data/patients/doe_john'), 'data_source must be a short name'),
      (dict(accuracy_per_category={'Brain': 0.5}), 'accuracy_per_category keys must be'),
      (dict(accuracy_per_category={'CXR': 1.5}), r'accuracy_per_category.CXR must be a number'),
      (dict(rounds=4), r'rounds must equal the ledger rounds_completed \(3\)'),
      (dict(accuracy_per_category={'CXR': 0.91}, eval_counts_per_category={'CXR': 7}),
       r'accuracy_per_category.CXR must be a count of correct images over '
       r'eval_counts_per_category.CXR \(7\)'),
      (dict(eval_counts_per_category={'CXR': 7}),
       'accuracy_per_category.CXR must be given with eval_counts_per_category.CXR = 7'),
      (dict(eval_counts_per_category={'CXR': -1}),
       'eval_counts_per_category.CXR must be a non-negative integer'),
      (dict(eval_counts_per_category={'Brain': 3}), 'eval_counts_per_category keys must be'),
      (dict(date='31/05/2024'), 'date must be an ISO date'),
      (dict(num_clients=999), r'num_clients must equal the ledger\'s number of clients \(1000\)'),
      (dict(model_version='/home/doe/run1'), 'model_version must be a short name'),
      (dict(evaluation_data_source='C:\\scans'), 'evaluation_data_source must be a short name'),
  ])
  def test_bad_card_input_refused(self, tmp_path, policy, ledger_json, kwargs, message):
    with pytest.raises(TffMedicalError, match=message):
      saved_model.write_model_card(tmp_path / 'c.json', policy, ledger_json, **kwargs)
    assert not os.path.exists(tmp_path / 'c.json')

  def test_ledger_of_another_policy_refused(self, tmp_path, policy, ledger_json):
    with pytest.raises(saved_model.ExportError,
                       match=r'ledger categories.HeadCT.target_epsilon must equal the policy'):
      saved_model.write_model_card(tmp_path / 'c.json', policy.scaled(2.0), ledger_json)

  def test_invalid_ledger_refused(self, tmp_path, policy, ledger_json):
    broken = json.loads(json.dumps(ledger_json))
    broken['categories']['CXR']['epsilon_spent'] = 99.0
    with pytest.raises(TffMedicalError, match='must not exceed target_epsilon'):
      saved_model.write_model_card(tmp_path / 'c.json', policy, broken)


# Test counts and correct answers chosen to be the examples of Newcombe (1998), "Two-sided
# confidence intervals for the single proportion", Statistics in Medicine 17:857, Table I, whose
# Wilson score intervals (method 3) are published to 4 decimals; plus an all-correct category.
_NEWCOMBE = {
    'HeadCT': (81, 263, (0.2553, 0.3662)),
    'BreastMRI': (15, 148, (0.0624, 0.1605)),
    'AbdomenCT': (0, 20, (0.0, 0.1611)),
    'ChestCT': (1, 29, (0.0061, 0.1718)),
    'CXR': (40, 40, None),
}


def _wilson(correct, total, level=0.95):
  """The Wilson score interval written out (Wilson 1927), independent of scipy."""
  z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
  p, n = correct / total, total
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, center - half), min(1.0, center + half)


@pytest.fixture(scope='module')
def two_relation_ledger_json(policy):
  """A ledger whose relation (b) is noisier in cost than (a): swapped figures would show."""
  ledger = ledger_lib.PrivacyLedger(
      policy, {c: 4.0 for c in categories.CATEGORY_IDS},
      sampling.SamplingSpec(method='poisson', total_clients=1000,
                            expected_clients_per_round=20),
      whole_client_noise_multipliers={c: 3.5 for c in categories.CATEGORY_IDS})
  for _ in range(3):
    ledger.record_round({
        c: accounting.CategoryRoundEvents(dp_accounting.GaussianDpEvent(4.0),
                                          dp_accounting.GaussianDpEvent(3.5))
        for c in categories.CATEGORY_IDS})
  return ledger.to_json_dict()


def _card(policy, ledger, data_source, **kwargs):
  return saved_model.build_model_card(
      policy, ledger, data_source=data_source,
      accuracy_per_category={c: k / n for c, (k, n, _) in _NEWCOMBE.items()},
      eval_counts_per_category=dict({c: n for c, (_, n, _) in _NEWCOMBE.items()}, Hand=0),
      **kwargs)


class TestHonestModelCard:
  """The model-card sections users expect, for a demonstration (phantom) and a real-data model."""

  @pytest.fixture(scope='class')
  def phantom_card(self, policy, two_relation_ledger_json):
    return _card(policy, two_relation_ledger_json, 'phantoms')

  @pytest.fixture(scope='class')
  def mednist_card(self, policy, two_relation_ledger_json):
    return _card(policy, two_relation_ledger_json, 'mednist')

  def test_sections_in_model_card_order(self, phantom_card):
    keys = list(phantom_card)
    for earlier, later in [('model_details', 'intended_use'), ('intended_use', 'training_data'),
                           ('training_data', 'evaluation_data'), ('evaluation_data', 'metrics'),
                           ('metrics', 'limitations'), ('limitations', 'privacy')]:
      assert keys.index(earlier) < keys.index(later)
    assert phantom_card['schema_version'] == 2
    assert phantom_card['model_details']['date'] == datetime.datetime.now(
        datetime.timezone.utc).date().isoformat()

  def test_phantom_model_says_demonstration_never_saw_a_real_image(self, phantom_card):
    assert phantom_card['synthetic_training_data'] is True
    assert phantom_card['demonstration_only'] is True
    training = phantom_card['training_data']
    assert training['synthetic'] is True and training['num_clients'] == 1000
    assert 'synthetic phantoms generated by tff_medical' in training['description']
    assert 'never seen a real medical image' in training['description']
    use = phantom_card['intended_use']
    assert any('research' in u for u in use['primary_uses'])
    assert any('demonstration' in u for u in use['primary_uses'])
    assert any('clinical diagnosis' in u for u in use['out_of_scope_uses'])
    assert any('real images' in u for u in use['out_of_scope_uses'])
    assert 'never seen a real medical image' in phantom_card['limitations'][0]
    assert 'meaningless' in phantom_card['serving_warning']

  def test_limitations(self, phantom_card):
    text = '\n'.join(phantom_card['limitations'])
    assert 'six MedNIST classes' in text and '64x64 grayscale' in text
    assert 'float32' in text and 'OS entropy' in text and 'no discrete Gaussian' in text
    assert 'Not a medical device' in text
    noise = phantom_card['privacy']['floating_point_noise']
    assert 'Mironov' in noise['known_attack'] and '2012' in noise['known_attack']
    assert 'Philox' in noise['implementation']
    assert 'discrete Gaussian with secure aggregation' in noise['mitigation']

  def test_evaluation_data_not_covered_by_the_guarantee(self, phantom_card, mednist_card):
    for card, images in ((phantom_card, 'synthetic'), (mednist_card, 'real')):
      evaluation = card['evaluation_data']
      assert evaluation['covered_by_privacy_guarantee'] is False
      assert card['metrics']['covered_by_privacy_guarantee'] is False
      assert evaluation['privacy'].startswith(
          'The evaluation metrics are NOT covered by the differential-privacy guarantee')
      assert f'held-out {images} images and released as is' in evaluation['privacy']
    assert 'custodian\'s held-out test split of MedNIST' in (
        mednist_card['evaluation_data']['description'])

  def test_real_data_model(self, mednist_card):
    assert mednist_card['synthetic_training_data'] is False
    assert mednist_card['demonstration_only'] is False
    assert mednist_card['serving_warning'] is None
    training = mednist_card['training_data']
    assert 'custodian\'s MedNIST images, partitioned over 1000 clients' in training['description']
    assert training['per_client_counts'].startswith('not published')
    assert not any('phantoms' in line for line in mednist_card['limitations'])

  def test_wilson_intervals_agree_with_independent_computations(self, phantom_card):
    per_category = phantom_card['metrics']['per_category']
    for c, (correct, total, published) in _NEWCOMBE.items():
      entry = per_category[c]
      assert (entry['correct'], entry['test_images']) == (correct, total)
      assert entry['accuracy'] == pytest.approx(correct / total)
      low, high = entry['ci95']
      assert (low, high) == pytest.approx(_wilson(correct, total), abs=1e-9)
      if published is not None:
        assert (round(low, 4), round(high, 4)) == published
      assert low <= correct / total <= high
    # statsmodels, when installed, is a third computation.
    try:
      # pylint: disable-next=g-import-not-at-top
      from statsmodels.stats.proportion import proportion_confint
    except ImportError:
      proportion_confint = None
    if proportion_confint is not None:
      for c, (correct, total, _) in _NEWCOMBE.items():
        assert per_category[c]['ci95'] == pytest.approx(
            list(proportion_confint(correct, total, method='wilson')), abs=1e-9)
    # No test image of Hand: nothing measured, no interval invented.
    assert per_category['Hand'] == {'display_name': 'Hand X-ray', 'accuracy': None,
                                    'test_images': 0, 'correct': None, 'ci95': None}

  def test_exact_privacy_statement_names_both_relations(self, phantom_card,
                                                        two_relation_ledger_json):
    source = two_relation_ledger_json['categories']['BreastMRI']
    a = source['relations']['remove_category_examples']['epsilon']
    b = source['relations']['remove_whole_client']['epsilon']
    assert a < b == source['epsilon_spent']  # z 3.5 under (b): the larger figure is b.
    entry = phantom_card['privacy']['categories']['BreastMRI']
    assert entry['epsilon_by_relation'] == {'remove_category_examples': a,
                                            'remove_whole_client': b}
    assert entry['statement'] == (
        f'Breast MRI (High privacy): everything released is ({b:.4g}, 1e-05)-differentially '
        'private with respect to both (a) adding or removing all of one client\'s Breast MRI '
        f'examples, the client stays (epsilon {a:.4g}), and (b) adding or removing one whole '
        f'client whose only examples are Breast MRI (epsilon {b:.4g}); rdp accountant, poisson '
        'sampling of clients (rate 0.02), 3 released rounds; target epsilon 0.5.')
    privacy = phantom_card['privacy']
    client = two_relation_ledger_json['client_level_epsilon']
    assert privacy['statement'].startswith(
        'Per category c, with epsilon_c and delta below: everything released is (epsilon_c, '
        'delta)-differentially private with respect to (a) adding or removing all of one '
        'client\'s category-c examples, the client stays, and (b) adding or removing one whole '
        'client whose only examples are category c; epsilon_c is the larger of the two. '
        f'A client holding images of several categories: ({client:.4g}, 1e-05)-differential '
        'privacy with respect to adding or removing one whole client, whatever its categories')
    assert privacy['privacy_unit'] == 'client' and privacy['accountant'] == 'rdp'
    assert 'audit_log.jsonl' in privacy['not_published']
    assert 'partition_manifest.json' in privacy['not_published']
    assert 'model_card.json' in privacy['published']
    assert not set(privacy['published']) & set(privacy['not_published'])

  def test_schema_1_ledger_says_relation_b_is_not_accounted(self, policy, ledger_json):
    old = json.loads(json.dumps(ledger_json))
    old['schema_version'] = 1
    for key in ('neighboring_relations', 'earlier_runs'):
      old.pop(key, None)
    for entry in old['categories'].values():
      entry.pop('relations', None)
      entry.pop('epsilon_this_run', None)
    card = saved_model.build_model_card(policy, old, data_source='phantoms')
    entry = card['privacy']['categories']['CXR']
    assert entry['epsilon_by_relation'] is None
    assert entry['statement'].startswith(
        f'CXR (X-ray) (Low privacy): everything released is ({entry["epsilon_spent"]:.4g}, '
        '1e-05)-differentially private with respect to (a) adding or removing all of one '
        'client\'s CXR (X-ray) examples, the client stays;')
    assert entry['statement'].endswith(
        'Relation (b), adding or removing one whole client whose only examples are CXR (X-ray), '
        'is not accounted in this ledger (schema version 1): under it the other categories\' '
        'clipped counts move too, and its epsilon can be slightly larger.')
    assert '; this ledger accounts (a) only.' in card['privacy']['statement']

  def test_export_and_run_card_agree(self, tmp_path, model, policy, two_relation_ledger_json):
    extra = {'data_source': 'phantoms', 'accuracy_per_category': {'CXR': 0.75},
             'eval_counts_per_category': {'CXR': 4}, 'date': '2024-05-31'}
    export_dir = saved_model.export_saved_model(model, tmp_path / 'm', policy,
                                                two_relation_ledger_json, model_card_extra=extra)
    with open(os.path.join(export_dir, saved_model.MODEL_CARD_FILENAME)) as f:
      exported = json.load(f)
    # What program.export passes for the run folder's card.
    written = saved_model.write_model_card(
        tmp_path, policy, two_relation_ledger_json,
        model_sha256=audit.model_weights_sha256(model.get_weights()),
        **saved_model.describe_model(model), **extra)
    assert exported == written
    assert exported['metrics']['per_category']['CXR']['ci95'] == pytest.approx(
        list(_wilson(3, 4)))


class TestExportRefusals:

  def test_non_empty_export_dir_refused(self, tmp_path, model, policy):
    (tmp_path / 'old.txt').write_text('previous export')
    with pytest.raises(saved_model.ExportError, match='export_dir must not exist or be empty'):
      saved_model.export_saved_model(model, tmp_path, policy)

  def test_wrong_model_shape_refused(self, tmp_path, policy):
    wrong = cnn.build_cnn(conv_filters=(2,), num_classes=5)
    with pytest.raises(saved_model.ExportError, match=r'keras_model must map'):
      saved_model.export_saved_model(wrong, tmp_path / 'm', policy)
    assert os.listdir(tmp_path) == []

  def test_logits_model_refused(self, tmp_path, policy):
    logits = tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(64, 64, 1)),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(6, kernel_initializer='ones', bias_initializer='ones'),
    ])
    with pytest.raises(saved_model.ExportError, match='must end in a softmax'):
      saved_model.export_saved_model(logits, tmp_path / 'm', policy)

  def test_unknown_card_field_refused(self, tmp_path, model, policy):
    with pytest.raises(saved_model.ExportError, match='model_card_extra keys must be among'):
      saved_model.export_saved_model(model, tmp_path / 'm', policy,
                                     model_card_extra={'patient_name': 'x'})
    assert os.listdir(tmp_path) == []
