"""Prediction on files: PNG, JPEG and DICOM recognised by content and preprocessed exactly as the
training loaders do; a bad file gets a clear line, the others still get predictions."""

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image
import pydicom
from pydicom.data import get_testdata_file
import pytest

from tff_medical.data import dicom
from tff_medical.data import limits
from tff_medical.data import mednist
from tff_medical.export import predict
from tff_medical.export import saved_model
from tff_medical.privacy import policy as policy_lib

from helpers import random_weights_cnn  # pylint: disable=g-bad-import-order

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_REPO, 'experiments', 'predict.py')
# Local files of pydicom's test data only (others would be downloaded).
_CT_SMALL = get_testdata_file('CT_small.dcm')
_JPEG_LS = get_testdata_file('JPEGLSNearLossless_08.dcm')  # Needs a plugin not installed here.


@pytest.fixture(scope='module')
def model():
  return random_weights_cnn()


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory, model):
  directory = tmp_path_factory.mktemp('export') / 'model'
  saved_model.export_saved_model(model, directory, policy_lib.default_policy())
  return str(directory)


@pytest.fixture(scope='module')
def loaded(model_dir):
  return predict.load_model(model_dir)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Good and bad files, named so that the name never gives the format away."""
  root = tmp_path_factory.mktemp('files')
  rng = np.random.default_rng(5)
  gradient = (np.indices((100, 80)).sum(0) * 255 // 178).astype(np.uint8)
  Image.fromarray(gradient).save(root / 'scan1.png')  # 100x80, resized
  Image.fromarray(rng.integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(
      root / 'scan2.jpg', quality=95)  # color, resized
  Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(
      root / 'no_extension', format='PNG')
  shutil.copy(_CT_SMALL, root / 'ct.dcm')
  # The same CT as a raw dataset: no preamble, no 'DICM', no file meta.
  raw = pydicom.dcmread(_CT_SMALL)
  raw.preamble = None
  raw.file_meta = pydicom.dataset.FileMetaDataset()
  raw.save_as(root / 'ct_raw.bin', enforce_file_format=False, implicit_vr=True,
              little_endian=True)

  with open(root / 'scan1.png', 'rb') as f:
    png = f.read()
  (root / 'corrupt.png').write_bytes(png[:60])  # Signature and header, then cut.
  buffer = io.BytesIO()
  Image.fromarray(gradient).save(buffer, format='JPEG')
  (root / 'corrupt.jpg').write_bytes(buffer.getvalue()[:200])
  (root / 'notes.txt').write_text('Not an image at all.\n')
  with open(_CT_SMALL, 'rb') as f:
    (root / 'cut.dcm').write_bytes(f.read()[:-5000])  # Header intact, pixel data cut short.
  shutil.copy(_JPEG_LS, root / 'jpegls.dcm')
  (root / 'empty.png').write_bytes(b'')
  return root


def _training_image_of_png(path, tmp_path) -> np.ndarray:
  """What the MedNIST loader makes of a file (in a category folder of a MedNIST-like tree)."""
  os.makedirs(tmp_path / 'mednist' / 'Hand', exist_ok=True)
  shutil.copy(path, tmp_path / 'mednist' / 'Hand' / 'a.png')
  return mednist.load_mednist(tmp_path / 'mednist').images[0]


def _training_image_of_dicom(path, tmp_path) -> np.ndarray:
  """What the DICOM folder loader makes of a file; a rule matching CT_small's description."""
  os.makedirs(tmp_path / 'dicom', exist_ok=True)
  shutil.copy(path, tmp_path / 'dicom' / 'a.dcm')
  mapping = {'rules': [{'category': 'ChestCT', 'modalities': ['CT'], 'keywords': ['E']}]}
  return dicom.load_dicom_folder(tmp_path / 'dicom', mapping=mapping).images[0]


class TestPreprocessingMatchesTraining:

  @pytest.mark.parametrize('name', ['scan1.png', 'scan2.jpg', 'no_extension'])
  def test_png_and_jpeg(self, files, tmp_path, name):
    image = predict.read_image(str(files / name))
    assert image.shape == (64, 64) and image.dtype == np.uint8
    # The MedNIST loader picks files by extension; give the copy one it accepts.
    np.testing.assert_array_equal(image, _training_image_of_png(files / name, tmp_path))

  @pytest.mark.parametrize('name', ['ct.dcm', 'ct_raw.bin'])
  def test_dicom(self, files, tmp_path, name):
    image = predict.read_image(str(files / name))
    np.testing.assert_array_equal(image, _training_image_of_dicom(_CT_SMALL, tmp_path))
    assert image.std() > 10  # A real picture, not a flat fallback.


class TestPredictFiles:

  def test_predictions_equal_keras_on_the_same_images(self, model, loaded, files):
    names = ['scan1.png', 'notes.txt', 'ct.dcm', 'scan2.jpg', 'corrupt.png', 'ct_raw.bin']
    results = list(predict.predict_files(loaded, [str(files / n) for n in names], batch_size=4))
    assert [os.path.basename(r.path) for r in results] == names  # Order kept across batches.
    good = [r for r in results if isinstance(r, predict.Prediction)]
    assert [os.path.basename(r.path) for r in good] == ['scan1.png', 'ct.dcm', 'scan2.jpg',
                                                        'ct_raw.bin']
    images = np.stack([predict.read_image(r.path) for r in good])[..., None]
    expected = model.predict(images.astype(np.float32) / 255.0, verbose=0)
    policy = policy_lib.default_policy()
    for result, probabilities in zip(good, expected):
      budget = policy.budgets[int(probabilities.argmax())]
      assert result.category_id == budget.id
      assert result.display_name == budget.display_name
      assert result.privacy_level == budget.privacy_level.value
      assert result.probability == pytest.approx(float(probabilities.max()), abs=1e-5)

  @pytest.mark.parametrize('name, reason', [
      ('corrupt.png', 'corrupt or truncated PNG data'),
      ('corrupt.jpg', 'corrupt or truncated JPEG data'),
      ('notes.txt', 'unsupported format; expected PNG, JPEG or DICOM'),
      ('empty.png', 'unsupported format; expected PNG, JPEG or DICOM'),
      ('cut.dcm', dicom.REASON_BAD_PIXELS),
      ('jpegls.dcm', dicom.REASON_UNDECODABLE),
      ('absent.png', 'cannot open file: No such file or directory'),
  ])
  def test_failure_reasons(self, loaded, files, name, reason):
    (result,) = predict.predict_files(loaded, [str(files / name)])
    assert result == predict.ReadFailure(path=str(files / name), reason=reason)
    assert result.line() == f'{files / name}: cannot read image ({reason})'

  def test_fifo_device_and_oversized_image_are_refused_without_reading(self, loaded, tmp_path):
    # A FIFO used to block predict.py forever, a link to /dev/zero to read until memory ran out.
    os.mkfifo(tmp_path / 'pipe.dcm')
    os.symlink('/dev/zero', tmp_path / 'zero.png')
    buffer = io.BytesIO()
    Image.new('L', (1, 1)).save(buffer, format='PNG')
    header = bytearray(buffer.getvalue())
    header[16:24] = struct.pack('>II', 9000, 9000)  # Declares 81M pixels; holds one.
    header[29:33] = struct.pack('>I', zlib.crc32(bytes(header[12:29])))
    (tmp_path / 'large.png').write_bytes(bytes(header))
    (tmp_path / 'big.jpg').write_bytes(bytes(2048))
    names = ['pipe.dcm', 'zero.png', 'large.png', 'big.jpg']

    def expire(*_):
      raise AssertionError('reading blocked')

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    try:
      results = list(predict.predict_files(loaded, [str(tmp_path / n) for n in names]))
      with pytest.raises(predict.UnreadableImageError, match='file larger than max_file_bytes'):
        predict.read_image(str(tmp_path / 'big.jpg'), limits.InputLimits(max_file_bytes=1024))
    finally:
      signal.alarm(0)
      signal.signal(signal.SIGALRM, previous)
    assert [r.reason for r in results] == [
        'not a regular file', 'not a regular file', 'image larger than max_image_pixels',
        'unsupported format; expected PNG, JPEG or DICOM']

  def test_line_format(self):
    line = predict.Prediction(path='scan1.png', category_id='ChestCT', display_name='Chest CT',
                              privacy_level='Medium', probability=0.9312).line()
    assert line == 'scan1.png  Chest CT  (privacy: Medium)  p=0.93'

  def test_not_an_export_refused(self, tmp_path):
    with pytest.raises(predict.ModelDirError, match='model_dir must be a SavedModel folder'):
      predict.load_model(tmp_path)


@pytest.mark.slow  # End-to-end tier: the entry point in a fresh interpreter.
class TestScript:

  def _run(self, *args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    return subprocess.run([sys.executable, _SCRIPT, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)

  def test_good_files_predicted_bad_file_reported_exit_1(self, model_dir, files):
    done = self._run(f'--model_dir={model_dir}', 'scan1.png', 'scan2.jpg', 'ct.dcm',
                     'corrupt.png', cwd=files)
    assert done.returncode == 1, done.stderr[-2000:]
    display_names = {b.display_name: b.privacy_level.value
                     for b in policy_lib.default_policy().budgets}
    lines = done.stdout.splitlines()
    assert [line.split('  ')[0] for line in lines] == ['scan1.png', 'scan2.jpg', 'ct.dcm']
    for line in lines:
      _, name, privacy, probability = line.split('  ')
      assert privacy == f'(privacy: {display_names[name]})'
      assert probability.startswith('p=') and 0 < float(probability[2:]) <= 1
    assert 'corrupt.png: cannot read image (corrupt or truncated PNG data)' in (
        done.stderr.splitlines())
    assert 'Traceback' not in done.stderr

  def test_all_good_exit_0_and_bad_model_dir_one_line(self, model_dir, files, tmp_path):
    done = self._run(f'--model_dir={model_dir}', 'ct.dcm', cwd=files)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1
    done = self._run(f'--model_dir={tmp_path}', 'ct.dcm', cwd=files)
    assert done.returncode == 1 and done.stdout == ''
    assert done.stderr.strip().splitlines()[-1].startswith(
        'error: model_dir must be a SavedModel folder')
    assert 'Traceback' not in done.stderr


class TestTrainingDataWarning:
  """A model whose card says it was trained on synthetic data gets one warning; others none."""

  @pytest.fixture(scope='class')
  def synthetic_dir(self, tmp_path_factory, model):
    directory = tmp_path_factory.mktemp('synthetic') / 'model'
    saved_model.export_saved_model(model, directory, policy_lib.default_policy(),
                                   model_card_extra={'data_source': 'phantoms'})
    return str(directory)

  @pytest.fixture(scope='class')
  def real_dir(self, tmp_path_factory, model):
    directory = tmp_path_factory.mktemp('real') / 'model'
    saved_model.export_saved_model(model, directory, policy_lib.default_policy(),
                                   model_card_extra={'data_source': 'mednist'})
    return str(directory)

  def _run(self, model_dir, paths):
    out, err = io.StringIO(), io.StringIO()
    failures = predict.predict_and_print(model_dir, paths, out, err)
    return failures, out.getvalue().splitlines(), err.getvalue().splitlines()

  def test_synthetic_model_warns_exactly_once(self, synthetic_dir, files):
    names = ['ct.dcm', 'scan1.png', 'notes.txt', 'scan2.jpg', 'ct_raw.bin']
    failures, out, err = self._run(synthetic_dir, [str(files / n) for n in names])
    assert failures == 1 and len(out) == 4
    warnings = [line for line in err if line.startswith('warning:')]
    with open(os.path.join(synthetic_dir, saved_model.MODEL_CARD_FILENAME)) as f:
      card = json.load(f)
    assert warnings == [f'warning: {card["serving_warning"]}']
    assert err[0] == warnings[0]  # Before anything else.
    assert 'never seen a real medical image' in warnings[0]
    assert 'meaningless' in warnings[0]

  def test_real_data_model_does_not_warn(self, real_dir, files):
    failures, out, err = self._run(real_dir, [str(files / 'ct.dcm'), str(files / 'notes.txt')])
    assert failures == 1 and len(out) == 1
    assert not [line for line in err if line.startswith('warning:')]
    assert predict.training_data_warning(real_dir) is None

  def test_card_without_the_field_still_warns_for_phantoms(self, synthetic_dir, tmp_path):
    copy = tmp_path / 'model'
    shutil.copytree(synthetic_dir, copy)
    card_path = copy / saved_model.MODEL_CARD_FILENAME
    card = json.loads(card_path.read_text())
    for key in ('synthetic_training_data', 'serving_warning'):
      del card[key]  # As written before these fields existed.
    card_path.write_text(json.dumps(card))
    assert predict.training_data_warning(copy) == saved_model.SYNTHETIC_SERVING_WARNING
    # A crafted warning (terminal escapes) is replaced by the fixed text.
    card.update(synthetic_training_data=True, serving_warning='\x1b[2Jall fine')
    card_path.write_text(json.dumps(card))
    assert predict.training_data_warning(copy) == saved_model.SYNTHETIC_SERVING_WARNING

  def test_missing_card_warns_that_the_data_is_unknown(self, synthetic_dir, tmp_path):
    copy = tmp_path / 'model'
    shutil.copytree(synthetic_dir, copy)
    os.remove(copy / saved_model.MODEL_CARD_FILENAME)
    assert predict.training_data_warning(copy) == (
        f'{copy} has no readable model_card.json: what this model was trained on is unknown')
    (copy / saved_model.MODEL_CARD_FILENAME).write_text('{not json')
    assert 'no readable model_card.json' in predict.training_data_warning(copy)

  @pytest.mark.slow  # End-to-end tier: the entry point in a fresh interpreter.
  def test_script_warns_once_on_stderr(self, synthetic_dir, files):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    done = subprocess.run([sys.executable, _SCRIPT, f'--model_dir={synthetic_dir}', 'ct.dcm',
                           'scan1.png'], cwd=files, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 2
    warnings = [line for line in done.stderr.splitlines() if line.startswith('warning:')]
    assert warnings == [f'warning: {saved_model.SYNTHETIC_SERVING_WARNING}']
