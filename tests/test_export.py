"""SavedModel export: serves in a fresh process with TensorFlow alone and agrees with Keras; the
model card carries the ledger's guarantee per category and refuses what it must not hold."""

import json
import os
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
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.privacy import policy as policy_lib
from tff_medical.privacy import sampling

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
  keras_model = cnn.build_cnn(conv_filters=(4, 8), seed=3)
  # Random, not initial, weights (biases too, so that a variable lost in export would show),
  # drawn so that the images below win four different categories.
  rng = np.random.default_rng(1)
  keras_model.set_weights([
      rng.normal(scale=1.0 if w.ndim > 1 else 0.2, size=w.shape).astype(np.float32)
      for w in keras_model.get_weights()])
  return keras_model


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
    assert card['model']['model_sha256'] == audit.model_weights_sha256(model.get_weights())
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
    assert card['privacy'] == {
        'guarantee': 'none claimed: no privacy ledger was supplied at export'}
    assert card['rounds'] == 5

  def test_no_identifier_reaches_the_card(self, export_dir):
    with open(os.path.join(export_dir, saved_model.MODEL_CARD_FILENAME)) as f:
      text = f.read()
    # Only category ids appear as keys at category level; no client or patient field at all.
    for word in ('patient', 'client_0', 'PatientName', 'PatientID'):
      assert word not in text

  @pytest.mark.parametrize('kwargs, message', [
      (dict(data_source='/data/patients/doe_john'), 'data_source must be a short name'),
      (dict(accuracy_per_category={'Brain': 0.5}), 'accuracy_per_category keys must be'),
      (dict(accuracy_per_category={'CXR': 1.5}), r'accuracy_per_category.CXR must be a number'),
      (dict(rounds=4), r'rounds must equal the ledger rounds_completed \(3\)'),
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
