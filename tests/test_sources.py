"""The source registry (data/sources.py) and the one input scaling (data/model_input.py)."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tff_medical.crosssilo import coordinator
from tff_medical.data import dicom
from tff_medical.data import mednist
from tff_medical.data import model_input
from tff_medical.data import phantoms
from tff_medical.data import sources
from tff_medical.errors import ConfigError
from tff_medical.export import saved_model
from tff_medical.training import config as config_lib
from tff_medical.training import program

# --- Registry ---------------------------------------------------------------------------------


def test_every_reader_of_dataset_names_reads_the_registry():
  assert sources.NAMES == ('phantoms', 'mednist', 'dicom', 'pacs')
  assert config_lib.DATASETS == sources.NAMES
  assert coordinator.EVAL_DATASETS == ('none',) + sources.NAMES
  assert [n for n in sources.NAMES if sources.get(n).needs_data_dir] == ['mednist', 'dicom']


@pytest.mark.parametrize('name', ['mnist', '', None, ['phantoms']])
def test_unknown_source_is_a_config_error_naming_the_known_ones(name):
  with pytest.raises(ConfigError, match='dataset must be one of phantoms, mednist, dicom'):
    sources.get(name)


def test_config_validation_follows_each_sources_data_dir_need():
  for name in sources.NAMES:
    config = config_lib.base_config()
    config.dataset = name
    config.data_dir = '' if sources.get(name).needs_data_dir else '/some/folder'
    with pytest.raises(ConfigError, match='data_dir must be (set|empty)'):
      config_lib.validate(config)
  config = config_lib.base_config()
  config.dataset = 'imagenet'
  with pytest.raises(ConfigError, match="dataset must be one of .* Found 'imagenet'"):
    config_lib.validate(config)


def test_phantoms_source_is_the_generator_with_its_training_and_held_out_streams():
  train = sources.load('phantoms', num_per_category=2, seed=5, difficulty=0.5)
  expected = phantoms.generate(2, seed=5, difficulty=0.5)
  np.testing.assert_array_equal(train.images, expected.images)
  np.testing.assert_array_equal(train.labels, expected.labels)
  held_out = sources.load('phantoms', num_per_category=2, seed=5, held_out=True)
  np.testing.assert_array_equal(
      held_out.images, phantoms.generate(2, seed=5, stream=phantoms.TEST_STREAM).images)
  assert not np.array_equal(held_out.images, phantoms.generate(2, seed=5).images)


@pytest.mark.parametrize('name, module, function', [
    ('mednist', mednist, 'load_mednist'), ('dicom', dicom, 'load_dicom_folder')])
def test_sources_on_disk_call_their_loader_with_data_dir_only(monkeypatch, name, module,
                                                              function):
  calls = []
  monkeypatch.setattr(module, function, lambda *a, **k: calls.append((a, k)) or 'loaded')
  assert sources.load(name, data_dir='/data/x', num_per_category=3, seed=1,
                      held_out=True) == 'loaded'
  assert calls == [(('/data/x',), {})]


def test_program_load_images_reads_the_registry(monkeypatch):
  config = ml_collections.ConfigDict({'dataset': 'phantoms', 'data_dir': '',
                                      'num_per_category': 2, 'seed': 3})
  np.testing.assert_array_equal(program.load_images(config).images,
                                phantoms.generate(2, seed=3).images)
  calls = []
  monkeypatch.setattr(mednist, 'load_mednist', lambda d: calls.append(d) or 'loaded')
  config.dataset, config.data_dir = 'mednist', '/data/m'
  assert program.load_images(config) == 'loaded' and calls == ['/data/m']


def test_model_card_names_sources_from_the_registry():
  # pylint: disable=protected-access
  assert saved_model._is_synthetic('phantoms') and saved_model._is_synthetic('Phantoms')
  assert saved_model._is_synthetic('mednist') is False
  assert saved_model._is_synthetic('my-scans') is False
  assert saved_model._is_synthetic(None) is None
  assert saved_model._source_name('mednist') == 'MedNIST'
  assert saved_model._source_name('DICOM') == 'DICOM'
  assert saved_model._source_name('my-scans') == 'my-scans'


# --- Input scaling ----------------------------------------------------------------------------


def test_scaling_is_pixel_over_255_with_a_channel_axis():
  pixels = np.arange(256, dtype=np.uint8)
  images = np.tile(pixels, 16).reshape(1, 64, 64)
  x = model_input.to_model_input(images)
  assert x.shape == (1, 64, 64, 1) and x.dtype == np.float32
  np.testing.assert_array_equal(x[0, ..., 0].reshape(-1)[:256],
                                np.float32(pixels) / np.float32(255))
  assert x.min() == 0.0 and x.max() == 1.0
  assert model_input.to_model_input(images[0]).shape == (64, 64, 1)


def test_numpy_and_tensor_scaling_agree():
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
  expected = model_input.to_model_input(images)
  eager = model_input.to_model_input(tf.constant(images))
  assert eager.dtype == tf.float32 and eager.shape == (3, 64, 64, 1)
  np.testing.assert_array_equal(eager.numpy(), expected)
  # A traced graph may multiply by 1/255 instead of dividing: equal up to one float32 ulp.
  in_graph = tf.function(model_input.to_model_input)(tf.constant(images)).numpy()
  np.testing.assert_array_max_ulp(in_graph, expected, maxulp=1)
