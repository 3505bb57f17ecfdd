"""Tests of the embedded phantom source, its TFDS builder and the centralized baseline."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tff_medical import categories
from tff_medical.data import phantoms
from tff_medical.errors import ConfigError
from tff_medical.errors import DataError

_NUM = categories.NUM_CATEGORIES
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def train_test():
  """Disjoint streams of one seed, big enough for the separability checks to be stable."""
  return (phantoms.generate(60, seed=0, stream=phantoms.TRAIN_STREAM),
          phantoms.generate(60, seed=0, stream=phantoms.TEST_STREAM))


# ---- Determinism, balance, format. ----


def test_same_seed_gives_identical_bytes():
  first, second = phantoms.generate(5, seed=3), phantoms.generate(5, seed=3)
  assert first.images.tobytes() == second.images.tobytes()
  np.testing.assert_array_equal(first.labels, second.labels)


def test_thread_count_does_not_change_the_images(monkeypatch):
  threaded = phantoms.generate(20, seed=2)
  monkeypatch.setattr(phantoms, '_MAX_WORKERS', 1)
  assert phantoms.generate(20, seed=2).images.tobytes() == threaded.images.tobytes()


@pytest.mark.parametrize('other', [
    dict(seed=4),
    dict(seed=3, stream=phantoms.TEST_STREAM),
    dict(seed=3, difficulty=0.9),
], ids=['other_seed', 'other_stream', 'other_difficulty'])
def test_other_arguments_give_other_images(other):
  base = phantoms.generate(5, seed=3)
  changed = phantoms.generate(5, **other)
  # Not one image in common: a test split must never repeat a training image.
  base_set = {image.tobytes() for image in base.images}
  assert not base_set & {image.tobytes() for image in changed.images}


def test_a_category_is_the_same_whatever_the_other_counts():
  alone = phantoms.generate({'Hand': 4}, seed=1)
  mixed = phantoms.generate({'Hand': 4, 'CXR': 9}, seed=1)
  hands = mixed.images[mixed.labels == categories.label_of('Hand')]
  assert {i.tobytes() for i in alone.images} == {i.tobytes() for i in hands}


def test_exact_class_balance_and_shuffled():
  data = phantoms.generate(7, seed=0)
  assert data.category_counts() == {c: 7 for c in categories.CATEGORY_IDS}
  assert len(data) == 7 * _NUM
  # Shuffled: not sorted by label (a sorted order of 42 labels by chance is impossible).
  assert np.any(np.diff(data.labels) < 0)
  assert data.report.source == 'phantoms' and data.report.loaded == 42
  assert not data.report.skipped


def test_mapping_counts_and_missing_categories():
  data = phantoms.generate({'CXR': 3, 'HeadCT': 2, 'Hand': 0}, seed=0)
  assert data.category_counts() == {
      'HeadCT': 2, 'BreastMRI': 0, 'AbdomenCT': 0, 'ChestCT': 0, 'CXR': 3, 'Hand': 0}


def test_shape_dtype_and_value_range(train_test):
  data, _ = train_test
  assert data.images.dtype == np.uint8 and data.labels.dtype == np.int32
  assert data.images.shape == (60 * _NUM, categories.IMAGE_SIZE, categories.IMAGE_SIZE)
  assert set(np.unique(data.labels)) == set(range(_NUM))
  # Every image has content and contrast, none is saturated flat.
  per_image_std = data.images.reshape(len(data), -1).std(axis=1)
  assert per_image_std.min() > 10.0
  assert data.images.max() == 255 and data.images.min() == 0


def test_generate_one():
  one = phantoms.generate_one('Hand', np.random.default_rng(5))
  again = phantoms.generate_one('Hand', np.random.default_rng(5))
  assert one.shape == (categories.IMAGE_SIZE, categories.IMAGE_SIZE) and one.dtype == np.uint8
  assert one.tobytes() == again.tobytes()
  assert one.tobytes() != phantoms.generate_one('Hand', np.random.default_rng(6)).tobytes()


@pytest.mark.parametrize('call', [
    lambda: phantoms.generate({'Brain': 3}),
    lambda: phantoms.generate({'Hand': -1}),
    lambda: phantoms.generate(2.5),
    lambda: phantoms.generate(3, seed=-1),
    lambda: phantoms.generate(3, difficulty=1.5),
    lambda: phantoms.generate_one('Knee', np.random.default_rng(0)),
], ids=['unknown_category', 'negative_count', 'float_count', 'negative_seed',
        'difficulty_above_one', 'unknown_category_one'])
def test_bad_arguments_raise_data_error(call):
  with pytest.raises(DataError):
    call()


def test_unknown_category_message_names_it():
  with pytest.raises(DataError, match="'Brain'"):
    phantoms.generate({'Brain': 3})


# ---- Not trivial: simple classifiers on raw pixels must fail often. ----


def _nearest_mean_accuracy(train_x, train_y, test_x, test_y) -> float:
  """Accuracy of assigning each test row to the class whose training mean is nearest."""
  labels = np.unique(train_y)
  means = np.stack([train_x[train_y == k].mean(axis=0) for k in labels])
  distances = ((test_x[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
  return float(np.mean(labels[distances.argmin(axis=1)] == test_y))


def test_nearest_class_mean_on_pixels_is_far_from_perfect(train_test):
  train, test = train_test
  flat = lambda d: d.images.reshape(len(d), -1).astype(np.float32)
  accuracy = _nearest_mean_accuracy(flat(train), train.labels, flat(test), test.labels)
  # Well above chance (1/6: the categories do differ) yet far from perfect (they overlap).
  assert 0.4 < accuracy < 0.95, accuracy


def test_mean_intensity_alone_does_not_separate_categories(train_test):
  train, test = train_test
  mean = lambda d: d.images.reshape(len(d), -1).mean(axis=1, keepdims=True)
  accuracy = _nearest_mean_accuracy(mean(train), train.labels, mean(test), test.labels)
  assert accuracy < 0.6, accuracy


def test_chest_and_abdomen_ct_overlap_more_with_difficulty():
  """The documented knob: at 0 the two CT categories are apart, at 1 they share slices."""
  def chest_abdomen_accuracy(difficulty):
    counts = {'ChestCT': 80, 'AbdomenCT': 80}
    train = phantoms.generate(counts, seed=0, difficulty=difficulty)
    test = phantoms.generate(counts, seed=0, difficulty=difficulty, stream=1)
    flat = lambda d: d.images.reshape(len(d), -1).astype(np.float32)
    return _nearest_mean_accuracy(flat(train), train.labels, flat(test), test.labels)
  assert chest_abdomen_accuracy(0.0) > chest_abdomen_accuracy(1.0) + 0.05


# ---- The TFDS builder. ----


def test_tfds_builder_builds_a_tiny_dataset(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  from tff_medical.data import tfds_phantoms  # pylint: disable=g-import-not-at-top

  builder = tfds_phantoms.TffMedicalPhantoms(
      config=tfds_phantoms.PhantomsConfig(name='test', train_per_category=3,
                                          test_per_category=2),
      data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds_phantoms.NO_GCS)
  assert builder.info.name == 'tff_medical_phantoms'
  assert str(builder.info.version) == '1.0.0'
  assert builder.info.features['label'].names == list(categories.CATEGORY_IDS)
  assert builder.info.splits['train'].num_examples == 3 * _NUM
  assert builder.info.splits['test'].num_examples == 2 * _NUM
  examples = list(tfds.as_numpy(builder.as_dataset(split='train')))
  images = np.stack([e['image'] for e in examples])
  labels = np.array([e['label'] for e in examples])
  assert images.shape == (3 * _NUM, 64, 64, 1) and images.dtype == np.uint8
  assert np.bincount(labels, minlength=_NUM).tolist() == [3] * _NUM
  # The same images as the generator's (PNG is lossless), whatever order TFDS stores them in.
  expected = phantoms.generate(3, seed=0, stream=phantoms.TRAIN_STREAM)
  got = sorted((int(l), i[:, :, 0].tobytes()) for l, i in zip(labels, images))
  want = sorted((int(l), i.tobytes()) for l, i in zip(expected.labels, expected.images))
  assert got == want


def test_tfds_named_configs():
  from tff_medical.data import tfds_phantoms  # pylint: disable=g-import-not-at-top

  configs = {c.name: c for c in tfds_phantoms.TffMedicalPhantoms.BUILDER_CONFIGS}
  assert configs['default'].train_per_category == 2000
  assert configs['tiny'].train_per_category == 8 and configs['tiny'].test_per_category == 4


# ---- The centralized baseline. ----


def test_centralized_training_reports_per_category_accuracy():
  from tff_medical.models import centralized  # pylint: disable=g-import-not-at-top

  train = phantoms.generate(10, seed=0)
  test = phantoms.generate({'Hand': 4, 'CXR': 2}, seed=0, stream=phantoms.TEST_STREAM)
  result = centralized.train_centralized(train, test, epochs=1, batch_size=16)
  assert result.num_train == 60 and result.num_test == 6
  assert result.confusion.sum() == 6 and result.confusion.shape == (_NUM, _NUM)
  assert 0.0 <= result.accuracy <= 1.0
  assert np.isnan(result.per_category_accuracy['HeadCT'])  # No test images of it.
  assert 0.0 <= result.per_category_accuracy['Hand'] <= 1.0
  assert result.accuracy == pytest.approx(np.trace(result.confusion) / 6)


@pytest.mark.parametrize('kwargs', [dict(epochs=0), dict(batch_size=-1), dict(learning_rate=0.0)],
                         ids=['epochs', 'batch_size', 'learning_rate'])
def test_centralized_rejects_bad_settings(kwargs):
  from tff_medical.models import centralized  # pylint: disable=g-import-not-at-top

  data = phantoms.generate(1, seed=0)
  with pytest.raises(ConfigError):
    centralized.train_centralized(data, data, **kwargs)


def test_baseline_never_imports_tensorflow_federated():
  code = ('import runpy, sys; sys.argv = ["baseline.py", "--helpshort"]\n'
          'try:\n  runpy.run_path("experiments/baseline.py", run_name="__main__")\n'
          'except SystemExit:\n  pass\n'
          'assert "tensorflow_federated" not in sys.modules, "TFF was imported"\n'
          'assert "tff_medical.models.centralized" in sys.modules\n')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  completed = subprocess.run([sys.executable, '-c', code], cwd=_REPO, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr[-2000:]
