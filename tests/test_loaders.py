"""Real-data loaders on good and bad input: MedNIST folder and archive, the TFDS builder, DICOM.

Every user-input failure must be a DataError naming what is wrong; one bad file among good ones
is skipped and counted, never fatal. Images are tiny JPEGs and copies of pydicom's test files.
"""

import io
import logging
import os
import shutil
import tarfile

import numpy as np
from PIL import Image
import pydicom
from pydicom.data import get_testdata_file
import pytest

from tff_medical import categories
from tff_medical.data import dicom
from tff_medical.data import mednist
from tff_medical.errors import DataError

# A gray level per category, so that a label can be checked against the pixels it came with.
_GRAY = {c: 20 + 40 * i for i, c in enumerate(categories.CATEGORY_IDS)}


def _jpeg_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def _write(path, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _make_mednist(root, per_category=3):
  """MedNIST's layout: <root>/<category>/<serial>.jpeg, uniform images of the category's gray."""
  for category in categories.CATEGORY_IDS:
    for i in range(per_category):
      image = np.full((64, 64), _GRAY[category], np.uint8)
      _write(os.path.join(root, category, f'{i:06d}.jpeg'), _jpeg_bytes(image))
  return str(root)


def _archive(folder, archive_path, arcname='MedNIST'):
  with tarfile.open(archive_path, 'w:gz') as archive:
    archive.add(folder, arcname=arcname)
  return str(archive_path)


def _truncated_jpeg() -> bytes:
  noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
  data = _jpeg_bytes(noise)
  return data[:len(data) * 2 // 5]


def _check_labels_match_pixels(data):
  for image, label in zip(data.images, data.labels):
    assert abs(float(image.mean()) - _GRAY[categories.CATEGORY_IDS[label]]) < 3


# --- MedNIST folder and archive -------------------------------------------------------------


def test_folder_loads_every_category_with_matching_labels(tmp_path):
  data = mednist.load_mednist(_make_mednist(tmp_path / 'MedNIST'))
  assert data.images.shape == (18, 64, 64) and data.images.dtype == np.uint8
  assert data.category_counts() == {c: 3 for c in categories.CATEGORY_IDS}
  assert data.report.loaded == 18 and not data.report.skipped
  _check_labels_match_pixels(data)


def test_archive_is_streamed_and_equals_the_folder(tmp_path, monkeypatch):
  folder = _make_mednist(tmp_path / 'src' / 'MedNIST')
  archive = _archive(folder, tmp_path / 'MedNIST.tar.gz')

  def no_extraction(*args, **kwargs):
    raise AssertionError('the archive must not be extracted to disk')

  monkeypatch.setattr(tarfile.TarFile, 'extract', no_extraction)
  monkeypatch.setattr(tarfile.TarFile, 'extractall', no_extraction)
  from_archive, archive_keys = mednist.load_mednist_with_keys(archive)
  from_folder, folder_keys = mednist.load_mednist_with_keys(folder)
  np.testing.assert_array_equal(from_archive.images, from_folder.images)
  np.testing.assert_array_equal(from_archive.labels, from_folder.labels)
  assert archive_keys == folder_keys
  assert archive_keys[0] == 'AbdomenCT/000000.jpeg'


def test_folder_holding_the_extracted_mednist_folder_is_accepted(tmp_path):
  _make_mednist(tmp_path / 'MedNIST', per_category=1)
  data = mednist.load_mednist(tmp_path)
  assert len(data) == 6 and not data.report.skipped


def test_wrong_sizes_and_color_are_resized_and_converted_not_skipped(tmp_path, caplog):
  root = _make_mednist(tmp_path, per_category=1)
  rgb = np.full((80, 100, 3), _GRAY['Hand'], np.uint8)
  _write(os.path.join(root, 'Hand', 'big_rgb.jpeg'), _jpeg_bytes(rgb))
  small = np.full((32, 32), _GRAY['CXR'], np.uint8)
  _write(os.path.join(root, 'CXR', 'small.jpg'), _jpeg_bytes(small))
  png16 = io.BytesIO()
  Image.fromarray(np.full((64, 64), 257 * _GRAY['HeadCT'], np.uint16)).save(png16, format='PNG')
  _write(os.path.join(root, 'HeadCT', 'deep.png'), png16.getvalue())
  # absl's logger level may have been raised by an earlier test (Keras saving does that).
  with caplog.at_level(logging.INFO, logger='absl'):
    data = mednist.load_mednist(root)
  assert len(data) == 9 and not data.report.skipped
  _check_labels_match_pixels(data)
  assert '2 images were not 64x64 and were resized' in caplog.text


@pytest.mark.parametrize('as_archive', [False, True], ids=['folder', 'archive'])
def test_unknown_category_folder_is_reported_once(tmp_path, as_archive):
  root = _make_mednist(tmp_path / 'MedNIST', per_category=1)
  for i in range(3):
    _write(os.path.join(root, 'Knee', f'{i}.jpeg'), b'not even an image: never reported')
  _write(os.path.join(root, 'README.txt'), b'notes')
  _write(os.path.join(root, '.DS_Store'), b'hidden: ignored')
  data = mednist.load_mednist(_archive(root, tmp_path / 'a.tar.gz') if as_archive else root)
  assert len(data) == 6
  assert data.report.reasons() == {'unknown category folder': 1, 'not in a category folder': 1}
  prefix = 'MedNIST/' if as_archive else ''
  assert sorted((s.path, s.reason) for s in data.report.skipped) == [
      (prefix + 'Knee/', 'unknown category folder'),
      (prefix + 'README.txt', 'not in a category folder')]


def test_only_unknown_folders_is_an_error_naming_the_expected_folders(tmp_path):
  _write(os.path.join(tmp_path, 'Knee', '0.jpeg'), _jpeg_bytes(np.zeros((64, 64), np.uint8)))
  with pytest.raises(DataError, match='no category folder found.*AbdomenCT, BreastMRI'):
    mednist.load_mednist(tmp_path)


@pytest.mark.parametrize('name, content, reason', [
    ('truncated_jpeg', _truncated_jpeg(), 'unreadable image'),
    ('random_bytes_jpeg', np.random.default_rng(1).bytes(500), 'unreadable image'),
    ('text_file', b'not an image', 'not an image file'),
    ('empty_jpeg', b'', 'unreadable image'),
], ids=['truncated_jpeg', 'random_bytes_jpeg', 'text_file', 'empty_jpeg'])
@pytest.mark.parametrize('as_archive', [False, True], ids=['folder', 'archive'])
def test_mednist_bad_file_is_skipped_among_good_and_fatal_alone(tmp_path, name, content, reason,
                                                                as_archive):
  suffix = '.txt' if name == 'text_file' else '.jpeg'
  good = _make_mednist(tmp_path / 'good' / 'MedNIST', per_category=1)
  _write(os.path.join(good, 'Hand', name + suffix), content)
  bad = tmp_path / 'bad' / 'MedNIST'
  _write(os.path.join(bad, 'Hand', name + suffix), content)
  if as_archive:
    good = _archive(good, tmp_path / 'good.tar.gz')
    bad = _archive(bad, tmp_path / 'bad.tar.gz')

  data = mednist.load_mednist(good)
  assert len(data) == 6
  assert data.report.reasons() == {reason: 1}
  assert data.report.skipped[0].path.endswith(f'Hand/{name}{suffix}')
  assert f'1 {reason}' in data.report.summary()
  with pytest.raises(DataError, match=f'No usable image in .*1 {reason}'):
    mednist.load_mednist(bad)


def test_mednist_empty_folder_is_an_error(tmp_path):
  with pytest.raises(DataError, match='No usable image'):
    mednist.load_mednist(tmp_path)


def test_mednist_missing_path_and_non_archive_file_are_errors(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    mednist.load_mednist(tmp_path / 'nowhere')
  (tmp_path / 'MedNIST.zip').write_bytes(np.random.default_rng(3).bytes(2000))
  with pytest.raises(DataError, match='neither a folder nor a tar archive'):
    mednist.load_mednist(tmp_path / 'MedNIST.zip')


def test_truncated_archive_is_an_error_not_partial_data(tmp_path):
  # MedNIST's archive is ordered by category: keeping what was read would drop whole classes.
  root = tmp_path / 'src' / 'MedNIST'
  for category in categories.CATEGORY_IDS:
    for i in range(20):  # Noise: compresses badly, so the cut falls inside the members.
      noise = np.random.default_rng(i).integers(0, 256, (64, 64), dtype=np.uint8)
      _write(os.path.join(root, category, f'{i}.jpeg'), _jpeg_bytes(noise))
  archive = _archive(root, tmp_path / 'MedNIST.tar.gz')
  data = open(archive, 'rb').read()
  (tmp_path / 'cut.tar.gz').write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match='truncated or corrupt.*download it again'):
    mednist.load_mednist(tmp_path / 'cut.tar.gz')


# --- TFDS builder ---------------------------------------------------------------------------


@pytest.mark.parametrize('as_archive', [False, True], ids=['folder', 'archive'])
def test_tfds_builder_builds_from_manual_dir(tmp_path, as_archive):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tff_medical.data import tfds_mednist  # pylint: disable=g-import-not-at-top

  manual_dir = tmp_path / 'manual'
  folder = _make_mednist(manual_dir / 'MedNIST' if not as_archive else tmp_path / 'MedNIST',
                         per_category=5)
  if as_archive:
    manual_dir.mkdir()
    _archive(folder, manual_dir / 'MedNIST.tar.gz')
  keys = [f'{c}/{i:06d}.jpeg' for c in categories.CATEGORY_IDS for i in range(5)]
  expected_test = sum(tfds_mednist.is_test(k) for k in keys)
  assert 0 < expected_test < len(keys)  # Both splits are exercised by these file names.

  builder = tfds.builder('tff_medical_mednist', data_dir=str(tmp_path / 'tfds'))
  assert isinstance(builder, tfds_mednist.TffMedicalMednist)
  assert 'MedNIST.tar.gz' in builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))

  info = builder.info
  assert info.features['image'].shape == (64, 64, 1)
  assert info.features['image'].np_dtype == np.uint8
  assert info.features['label'].names == list(categories.CATEGORY_IDS)
  assert info.splits['test'].num_examples == expected_test
  assert info.splits['train'].num_examples == len(keys) - expected_test
  for split in ('train', 'test'):
    for image, label in tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True)):
      assert image.shape == (64, 64, 1) and image.dtype == np.uint8
      assert abs(float(image.mean()) - _GRAY[categories.CATEGORY_IDS[label]]) < 3


def test_tfds_builder_with_no_usable_image_is_a_data_error(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tff_medical.data import tfds_mednist  # pylint: disable=g-import-not-at-top,unused-import

  _write(os.path.join(tmp_path, 'manual', 'Hand', 'x.jpeg'), _truncated_jpeg())
  builder = tfds.builder('tff_medical_mednist', data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(DataError, match='No usable image.*1 unreadable image'):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))


def test_tfds_split_is_deterministic_and_about_the_stated_fraction():
  from tff_medical.data import tfds_mednist  # pylint: disable=g-import-not-at-top

  keys = [f'Hand/{i:06d}.jpeg' for i in range(5000)]
  first = [tfds_mednist.is_test(k) for k in keys]
  assert first == [tfds_mednist.is_test(k) for k in keys]
  # Binomial(5000, 0.1): standard deviation 21, so +-100 is a 4.7 sigma band.
  assert abs(sum(first) - 5000 * tfds_mednist.TEST_PERCENT / 100) < 100


# --- DICOM ----------------------------------------------------------------------------------


def _dicom_folder(root, *names):
  """Copies of pydicom's test files whose default mapping gives a category (J2K: head CT)."""
  os.makedirs(root, exist_ok=True)
  for i, name in enumerate(names):
    shutil.copy(get_testdata_file(name), os.path.join(root, f'{i}_{name}'))
  return str(root)


def _truncated_dicom() -> bytes:
  with open(get_testdata_file('J2K_pixelrep_mismatch.dcm'), 'rb') as f:
    data = f.read()
  return data[:len(data) // 2]


def _short_pixel_data_dicom() -> bytes:
  # pydicom's MR_truncated.dcm: 8130 of 8192 pixel bytes; a body part so that it maps.
  ds = pydicom.dcmread(get_testdata_file('MR_truncated.dcm'))
  ds.BodyPartExamined = 'BREAST'
  buffer = io.BytesIO()
  ds.save_as(buffer)
  return buffer.getvalue()


@pytest.mark.parametrize('name, content, reason', [
    ('random_bytes.dcm', np.random.default_rng(2).bytes(1000), 'not a DICOM file'),
    ('notes.txt', b'not an image', 'not a DICOM file'),
    ('tiny.dcm', b'DICM', 'not a DICOM file'),
    ('truncated.dcm', _truncated_dicom(), 'unreadable DICOM file'),
    ('short.dcm', _short_pixel_data_dicom(), 'unreadable pixel data'),
], ids=['random_bytes', 'text_file', 'tiny_file', 'truncated_dicom', 'short_pixel_data'])
def test_dicom_bad_file_is_skipped_among_good_and_fatal_alone(tmp_path, name, content, reason):
  good = _dicom_folder(tmp_path / 'good', 'J2K_pixelrep_mismatch.dcm')
  _write(os.path.join(good, name), content)
  data = dicom.load_dicom_folder(good)
  assert len(data) == 1
  assert data.report.reasons() == {reason: 1}

  bad = tmp_path / 'bad'
  _write(os.path.join(bad, name), content)
  with pytest.raises(DataError, match=f'No usable image in DICOM folder .*1 {reason}'):
    dicom.load_dicom_folder(bad)


def test_dicom_empty_folder_missing_folder_and_file_are_errors(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='No usable image'):
    dicom.load_dicom_folder(tmp_path / 'empty')
  with pytest.raises(DataError, match='does not exist or is not a folder'):
    dicom.load_dicom_folder(tmp_path / 'nowhere')
  with pytest.raises(DataError, match='does not exist or is not a folder'):
    dicom.load_dicom_folder(get_testdata_file('CT_small.dcm'))


def test_dicom_wrong_sizes_are_resized_not_skipped(tmp_path):
  # 512x512 (head CT), 128x128 (CT_small) and 64x32 (MR_small cropped) all come out 64x64.
  folder = _dicom_folder(tmp_path, 'J2K_pixelrep_mismatch.dcm')
  ct = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
  ct.BodyPartExamined = 'CHEST'
  ct.save_as(tmp_path / 'ct_small.dcm')
  mr = pydicom.dcmread(get_testdata_file('MR_small.dcm'))
  mr.BodyPartExamined = 'BREAST'
  mr.PixelData = np.ascontiguousarray(mr.pixel_array[:, :32]).tobytes()
  mr.Columns = 32
  mr.save_as(tmp_path / 'mr_cropped.dcm')
  data = dicom.load_dicom_folder(folder)
  assert data.images.shape == (3, 64, 64) and not data.report.skipped
  counts = data.category_counts()
  assert (counts['HeadCT'], counts['ChestCT'], counts['BreastMRI']) == (1, 1, 1)
