"""DICOM loader: category mapping, a viewer's pixel handling, and no patient identifier leaking.

All files are pydicom's own test files (on disk in the installed package, no download), copied to
tmp_path with the metadata a case needs. Expected pixels are computed here with numpy from the
DICOM formulas (PS3.3 C.11), not with pydicom's functions the loader uses.
"""

import json
import logging
import os
import traceback
import warnings

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
import pytest

from tff_medical import categories
from tff_medical.data import dicom
from tff_medical.errors import DataError

_DELETE = object()


def _copy(tmp_path, name, out_name=None, **changes):
  """A copy of pydicom's test file `name` with elements set (or deleted with _DELETE)."""
  ds = pydicom.dcmread(get_testdata_file(name))
  for keyword, value in changes.items():
    if value is _DELETE:
      if keyword in ds:
        delattr(ds, keyword)
    else:
      setattr(ds, keyword, value)
  path = tmp_path / (out_name or name)
  os.makedirs(path.parent, exist_ok=True)
  ds.save_as(path)
  return path


def _load_one(tmp_path, name, **changes):
  """Loads a folder holding one modified copy; returns its (64, 64) image."""
  folder = tmp_path / f'case_{len(list(tmp_path.iterdir()))}'
  _copy(folder, name, **changes)
  data = dicom.load_dicom_folder(folder)
  assert len(data) == 1, data.report.summary()
  return data.images[0].astype(np.float64)


def _raw(name) -> np.ndarray:
  return pydicom.dcmread(get_testdata_file(name)).pixel_array.astype(np.float64)


def _linear_window(values, center, width):
  """PS3.3 C.11.2.1.2.1 'LINEAR' onto [0, 255]."""
  return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0


def _halve(image):
  """128x128 -> 64x64 by 2x2 means: area averaging, exact for an integer factor."""
  return image.reshape(64, 2, 64, 2).mean(axis=(1, 3))


# --- Category mapping -----------------------------------------------------------------------


@pytest.mark.parametrize('modality, body_part, descriptions, expected', [
    ('CT', 'HEAD', (), 'HeadCT'),
    ('CT', 'brain ', (), 'HeadCT'),
    ('CT', 'SKULL', (), 'HeadCT'),
    ('CT', 'CHEST', (), 'ChestCT'),
    ('CT', 'THORAX', (), 'ChestCT'),
    ('CT', '', ('Lung screening low dose',), 'ChestCT'),
    ('CT', 'ABDOMEN', (), 'AbdomenCT'),
    ('CT', '', ('CT ABD/PELVIS W CONTRAST',), 'AbdomenCT'),
    ('CT', 'LIVER', (), 'AbdomenCT'),
    ('MR', 'BREAST', (), 'BreastMRI'),
    ('MR', '', ('', 'Bilateral breast DCE'), 'BreastMRI'),
    ('CR', 'CHEST', (), 'CXR'),
    ('DX', '', ('PA chest',), 'CXR'),
    ('DX', 'HAND', (), 'Hand'),
    ('CR', '', ('Left hand 2 views',), 'Hand'),
    ('CT', 'HEAD', ('CHEST',), 'HeadCT'),
], ids=['ct_head', 'ct_brain_lowercase', 'ct_skull', 'ct_chest', 'ct_thorax',
        'ct_lung_description', 'ct_abdomen', 'ct_abd_pelvis_description', 'ct_liver',
        'mr_breast', 'mr_breast_series_description', 'cr_chest', 'dx_chest_description',
        'dx_hand', 'cr_hand_description', 'body_part_wins_over_description'])
def test_default_mapping_categories(modality, body_part, descriptions, expected):
  mapping = dicom.DicomMapping.default()
  assert mapping.category_for(modality, body_part, descriptions) == (expected, None)


@pytest.mark.parametrize('modality, body_part, descriptions, reason', [
    ('MR', 'ABDOMEN', (), 'no category for metadata'),
    ('CT', 'KNEE', (), 'no category for metadata'),
    ('CT', '', (), 'no category for metadata'),
    ('US', 'CHEST', (), 'no category for metadata'),
    ('', 'HEAD', (), 'no category for metadata'),
    ('CT', '', ('Headache',), 'no category for metadata'),
    ('CT', '', ('CT CHEST ABDOMEN PELVIS',), 'ambiguous category for metadata'),
], ids=['mr_abdomen', 'ct_knee', 'ct_nothing', 'ultrasound', 'no_modality',
        'keyword_is_whole_word', 'two_categories'])
def test_default_mapping_skips(modality, body_part, descriptions, reason):
  mapping = dicom.DicomMapping.default()
  assert mapping.category_for(modality, body_part, descriptions) == (None, reason)


def test_default_mapping_covers_every_category():
  rules = dicom.DicomMapping.default().rules
  assert {r.category for r in rules} == set(categories.CATEGORY_IDS)


def test_files_are_labelled_from_their_metadata(tmp_path):
  _copy(tmp_path, 'CT_small.dcm', 'a.dcm', BodyPartExamined='CHEST')
  _copy(tmp_path, 'MR_small.dcm', 'b.dcm', SeriesDescription='T1 BREAST AX')
  _copy(tmp_path, 'J2K_pixelrep_mismatch.dcm', 'c.dcm')  # CT, BodyPartExamined HEAD as shipped.
  _copy(tmp_path, 'CT_small.dcm', 'd.dcm', Modality='DX', BodyPartExamined='HAND')
  _copy(tmp_path, 'examples_overlay.dcm', 'e.dcm')  # MR ABDOMEN: no default rule.
  _copy(tmp_path, 'CT_small.dcm', 'f.dcm', StudyDescription='CHEST ABDOMEN')
  data = dicom.load_dicom_folder(tmp_path)
  assert [categories.CATEGORY_IDS[i] for i in data.labels] == [
      'ChestCT', 'BreastMRI', 'HeadCT', 'Hand']
  assert [(s.path, s.reason) for s in data.report.skipped] == [
      ('file #4', 'no category for metadata'), ('file #5', 'ambiguous category for metadata')]
  assert dicom.list_dicom_files(tmp_path)[4] == 'e.dcm'


def test_extra_mapping_file_adds_rules(tmp_path):
  _copy(tmp_path / 'data', 'examples_overlay.dcm')
  extra = tmp_path / 'site.json'
  extra.write_text(json.dumps({'rules': [
      {'category': 'AbdomenCT', 'modalities': ['MR'], 'body_parts': ['ABDOMEN']}]}))
  data = dicom.load_dicom_folder(tmp_path / 'data', extra_mapping_path=extra)
  assert data.category_counts()['AbdomenCT'] == 1


def test_mapping_argument_replaces_the_default(tmp_path):
  _copy(tmp_path, 'J2K_pixelrep_mismatch.dcm')  # CT HEAD: no longer mapped.
  _copy(tmp_path, 'MR_small.dcm', BodyPartExamined='KNEE')
  mapping = {'rules': [{'category': 'Hand', 'modalities': ['MR'], 'body_parts': ['KNEE']}]}
  data = dicom.load_dicom_folder(tmp_path, mapping=mapping)
  assert data.category_counts()['Hand'] == 1 and data.category_counts()['HeadCT'] == 0
  assert data.report.reasons() == {'no category for metadata': 1}


@pytest.mark.parametrize('rules, message', [
    ([{'category': 'KneeMRI', 'modalities': ['MR'], 'body_parts': ['KNEE']}],
     "rule 0: Unknown category 'KneeMRI'"),
    ([{'category': 'Hand', 'modalities': ['CR'], 'bodypart': ['HAND']}],
     r"rule 0 has unknown keys \['bodypart'\]"),
    ([{'category': 'Hand', 'modalities': [], 'body_parts': ['HAND']}],
     'rule 0 "modalities" must not be empty'),
    ([{'category': 'Hand', 'modalities': ['CR']}], 'rule 0 needs "body_parts" or "keywords"'),
    ([{'category': 'CXR', 'modalities': ['CR'], 'keywords': ['X-RAY']}],
     "rule 0 keyword 'X-RAY' must be a single word"),
    ([{'category': 'CXR', 'modalities': 'CR', 'keywords': ['CHEST']}],
     'rule 0 "modalities" must be a list of non-empty strings'),
], ids=['unknown_category', 'misspelt_key', 'no_modality', 'no_body_part_or_keyword',
        'keyword_with_punctuation', 'modalities_not_a_list'])
def test_invalid_mapping_is_a_data_error(tmp_path, rules, message):
  with pytest.raises(DataError, match=message):
    dicom.load_dicom_folder(tmp_path, mapping={'rules': rules})
  path = tmp_path / 'extra.json'
  path.write_text(json.dumps({'rules': rules}))
  with pytest.raises(DataError, match=f'DICOM mapping {path}: {message}'):
    dicom.load_dicom_folder(tmp_path, extra_mapping_path=path)


def test_unreadable_mapping_file_is_a_data_error(tmp_path):
  path = tmp_path / 'extra.json'
  path.write_text('{"rules": [')
  with pytest.raises(DataError, match='is not valid JSON'):
    dicom.load_dicom_folder(tmp_path, extra_mapping_path=path)
  with pytest.raises(DataError, match='Cannot read DICOM mapping'):
    dicom.load_dicom_folder(tmp_path, extra_mapping_path=tmp_path / 'missing.json')


# --- Pixel handling -------------------------------------------------------------------------


def test_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path):
  # CT_small: 128x128 stored values 128..2191. Slope 2 moves HU so that the window below clips
  # both ends; with slope 1 the same window would give a different image.
  image = _load_one(tmp_path, 'CT_small.dcm', BodyPartExamined='CHEST', RescaleSlope=2,
                    RescaleIntercept=-1024, WindowCenter=1500, WindowWidth=2000)
  hounsfield = 2 * _raw('CT_small.dcm') - 1024
  expected = _halve(_linear_window(hounsfield, 1500, 2000))
  np.testing.assert_allclose(image, expected, atol=1)
  ignoring_slope = _halve(_linear_window(_raw('CT_small.dcm') - 1024, 1500, 2000))
  assert np.abs(image - ignoring_slope).max() > 50


def test_window_from_the_header(tmp_path):
  # MR_small ships Window Center 600, Width 1600 and is 64x64: no resize.
  image = _load_one(tmp_path, 'MR_small.dcm', BodyPartExamined='BREAST')
  np.testing.assert_allclose(image, _linear_window(_raw('MR_small.dcm'), 600, 1600), atol=1)


def test_min_max_without_a_window(tmp_path):
  image = _load_one(tmp_path, 'MR_small.dcm', BodyPartExamined='BREAST', WindowCenter=_DELETE,
                    WindowWidth=_DELETE)
  raw = _raw('MR_small.dcm')
  np.testing.assert_allclose(image, (raw - raw.min()) / (raw.max() - raw.min()) * 255, atol=1)


def test_monochrome1_is_inverted(tmp_path):
  image = _load_one(tmp_path, 'MR_small.dcm', BodyPartExamined='BREAST',
                    PhotometricInterpretation='MONOCHROME1')
  np.testing.assert_allclose(image, 255 - _linear_window(_raw('MR_small.dcm'), 600, 1600),
                             atol=1)


def test_voi_lut_sequence_is_applied(tmp_path):
  # A square-root VOI LUT over stored values 0..4095 (MR_small's are 127..2145), 16-bit output.
  lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
  item = Dataset()
  item.add_new('LUTDescriptor', 'US', [4096, 0, 16])
  item.add_new('LUTData', 'US', lut.tolist())
  image = _load_one(tmp_path, 'MR_small.dcm', BodyPartExamined='BREAST', WindowCenter=_DELETE,
                    WindowWidth=_DELETE, VOILUTSequence=Sequence([item]))
  raw = _raw('MR_small.dcm').astype(int)
  expected = (lut[raw] - float(lut.min())) / (float(lut.max()) - float(lut.min())) * 255
  np.testing.assert_allclose(image, expected, atol=1)


def test_multi_frame_uses_the_middle_frame(tmp_path):
  raw = pydicom.dcmread(get_testdata_file('MR_small.dcm')).pixel_array
  frames = np.stack([raw[::-1], raw, raw[:, ::-1]])
  image = _load_one(tmp_path, 'MR_small.dcm', BodyPartExamined='BREAST', NumberOfFrames=3,
                    PixelData=frames.astype('<i2').tobytes())
  np.testing.assert_allclose(image, _linear_window(raw.astype(float), 600, 1600), atol=1)
  assert np.abs(image - _linear_window(raw[::-1].astype(float), 600, 1600)).max() > 50


def test_enhanced_image_functional_groups_give_rescale_and_window(tmp_path):
  transform = Dataset()
  transform.RescaleSlope, transform.RescaleIntercept = 2, -1024
  window = Dataset()
  window.WindowCenter, window.WindowWidth = 1500, 2000
  shared = Dataset()
  shared.PixelValueTransformationSequence = Sequence([transform])
  shared.FrameVOILUTSequence = Sequence([window])
  image = _load_one(tmp_path, 'CT_small.dcm', BodyPartExamined='CHEST', RescaleSlope=_DELETE,
                    RescaleIntercept=_DELETE, SharedFunctionalGroupsSequence=Sequence([shared]))
  expected = _halve(_linear_window(2 * _raw('CT_small.dcm') - 1024, 1500, 2000))
  np.testing.assert_allclose(image, expected, atol=1)


def test_non_square_image_is_padded_with_black_not_stretched(tmp_path):
  raw = pydicom.dcmread(get_testdata_file('MR_small.dcm')).pixel_array
  crop = np.ascontiguousarray(raw[:, 10:42])  # 64 rows x 32 columns
  image = _load_one(tmp_path, 'MR_small.dcm', BodyPartExamined='BREAST', Columns=32,
                    PixelData=crop.tobytes())
  np.testing.assert_array_equal(image[:, :16], 0)
  np.testing.assert_array_equal(image[:, 48:], 0)
  np.testing.assert_allclose(image[:, 16:48], _linear_window(crop.astype(float), 600, 1600),
                             atol=1)


def test_color_is_converted_to_luminance(tmp_path):
  # 240x320 RGB ultrasound, relabelled: padded to 320x320 then averaged over 5x5 blocks.
  image = _load_one(tmp_path, 'examples_rgb_color.dcm', Modality='DX', BodyPartExamined='HAND')
  rgb = _raw('examples_rgb_color.dcm')
  luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
  square = np.zeros((320, 320))
  square[40:280] = luma
  np.testing.assert_allclose(image, square.reshape(64, 5, 64, 5).mean(axis=(1, 3)), atol=1)


def test_single_file_reader_matches_the_folder_loader(tmp_path):
  path = _copy(tmp_path / 'one', 'CT_small.dcm', BodyPartExamined='CHEST')
  from_folder = dicom.load_dicom_folder(tmp_path / 'one').images[0]
  np.testing.assert_array_equal(dicom.read_dicom_image(path), from_folder)
  with open(path, 'rb') as f:
    np.testing.assert_array_equal(dicom.read_dicom_image(f), from_folder)
  # Any metadata: no category is needed to look at one file.
  np.testing.assert_array_equal(
      dicom.read_dicom_image(get_testdata_file('CT_small.dcm')), from_folder)


def test_single_file_reader_without_preamble_needs_force(tmp_path):
  ds = pydicom.dcmread(get_testdata_file('MR_small.dcm'))
  raw_path = tmp_path / 'raw.dcm'
  # The bare dataset: no preamble, no 'DICM', no file meta, as old exports write it.
  ds.preamble = None
  del ds.file_meta
  pydicom.dcmwrite(raw_path, ds, implicit_vr=False, little_endian=True)
  with open(raw_path, 'rb') as f:
    head = f.read(132)
  assert head[128:132] != b'DICM'
  with pytest.raises(dicom.UnusableDicomError, match='not a DICOM file') as raised:
    dicom.read_dicom_image(raw_path)
  assert raised.value.reason == 'not a DICOM file'
  np.testing.assert_allclose(dicom.read_dicom_image(raw_path, force=True),
                             _linear_window(_raw('MR_small.dcm'), 600, 1600), atol=1)


@pytest.mark.parametrize('name, reason', [
    ('rtplan.dcm', 'no pixel data'),
    ('examples_palette.dcm', 'unsupported photometric interpretation'),
    ('MR_small_jpeg_ls_lossless.dcm', 'undecodable compressed pixel data'),
    ('MR_truncated.dcm', 'unreadable pixel data'),
], ids=['no_pixels', 'palette_color', 'jpeg_ls_without_plugin', 'short_pixel_data'])
def test_single_file_reader_reasons(name, reason):
  try:
    import pylibjpeg  # pylint: disable=g-import-not-at-top,unused-import
    if name == 'MR_small_jpeg_ls_lossless.dcm':
      pytest.skip('pylibjpeg installed: JPEG-LS decodes here')
  except ImportError:
    pass
  with pytest.raises(dicom.UnusableDicomError) as raised:
    dicom.read_dicom_image(get_testdata_file(name))
  assert raised.value.reason == reason and str(raised.value) == reason


# --- Patient identifiers --------------------------------------------------------------------

_IDENTIFYING = (
    'PatientName', 'PatientID', 'PatientBirthDate', 'OtherPatientIDs', 'PatientAddress',
    'InstitutionName', 'InstitutionAddress', 'ReferringPhysicianName', 'OperatorsName',
    'AccessionNumber', 'StudyID', 'StudyDate', 'StationName', 'StudyInstanceUID',
    'SeriesInstanceUID', 'SOPInstanceUID',
)
_SOURCES = ('CT_small.dcm', 'MR_small.dcm', 'J2K_pixelrep_mismatch.dcm', 'examples_overlay.dcm',
            'MR_truncated.dcm', 'rtdose.dcm')


def _identifiers() -> dict[str, str]:
  """Every informative identifying value of the source files, read in full with pydicom.

  Values shorter than 4 characters or of one repeated character ('----', '000000000') could
  occur anywhere by chance and identify nobody; they are left out.
  """
  found = {}
  for name in _SOURCES:
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword in _IDENTIFYING:
      value = str(ds.get(keyword, '') or '')
      if len(value) >= 4 and len(set(value)) > 1:
        found[value] = f'{name}:{keyword}'
  return found


def _private_folder(tmp_path):
  """Loadable and skipped files, some named after their patient as real exports often are."""
  ct = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
  _copy(tmp_path, 'CT_small.dcm', f'{ct.PatientID}.dcm', BodyPartExamined='CHEST')
  _copy(tmp_path, 'MR_small.dcm', 'mr.dcm', BodyPartExamined='BREAST')
  _copy(tmp_path, 'J2K_pixelrep_mismatch.dcm', 'head.dcm')
  overlay = pydicom.dcmread(get_testdata_file('examples_overlay.dcm'))
  _copy(tmp_path, 'examples_overlay.dcm', f'{overlay.PatientName}/{overlay.SOPInstanceUID}.dcm')
  _copy(tmp_path, 'MR_truncated.dcm', 'short.dcm', BodyPartExamined='BREAST')
  _copy(tmp_path, 'rtdose.dcm', 'dose.dcm')
  return tmp_path


def _assert_absent(identifiers, text, where):
  for value, origin in identifiers.items():
    assert value not in text, f'{origin} ({value!r}) found in {where}'


@pytest.fixture
def pydicom_debug(caplog):
  """pydicom in debug mode logs every element it reads, values included."""
  caplog.set_level(logging.DEBUG)
  pydicom.config.debug(True, default_handler=False)
  yield
  pydicom.config.debug(False, default_handler=False)


def test_no_identifier_leaves_the_loader(tmp_path, caplog, capsys, monkeypatch, pydicom_debug):
  del pydicom_debug  # Used for its effect.
  identifiers = _identifiers()
  assert len(identifiers) > 30
  folder = _private_folder(tmp_path / 'export')

  # The detectors can fail: a plain pydicom read in debug mode does log identifiers.
  caplog.clear()
  pydicom.dcmread(get_testdata_file('CT_small.dcm'))
  assert 'JFK IMAGING CENTER' in caplog.text
  caplog.clear()

  datasets = []
  dcmread = pydicom.dcmread

  def recording_dcmread(*args, **kwargs):
    datasets.append(dcmread(*args, **kwargs))
    return datasets[-1]

  monkeypatch.setattr(pydicom, 'dcmread', recording_dcmread)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    data = dicom.load_dicom_folder(folder)

  assert len(data) == 3
  assert data.report.reasons() == {'no category for metadata': 2, 'unreadable pixel data': 1}
  captured = capsys.readouterr()
  everything = {
      'returned object': repr(data) + repr(data.report.skipped) + data.report.summary(),
      'logs': caplog.text,
      'stdout/stderr': captured.out + captured.err,
      'warnings': ' '.join(str(w.message) for w in caught),
  }
  for where, text in everything.items():
    _assert_absent(identifiers, text, where)
  # Only the tags the mapping and the pixels need were parsed at all.
  assert len(datasets) == 6
  allowed = set(dicom._TAGS) | {'SpecificCharacterSet'}  # pylint: disable=protected-access
  for ds in datasets:
    assert {e.keyword for e in ds} <= allowed
  # pydicom's logging is back as it was.
  assert logging.getLogger('pydicom').level == logging.DEBUG


def test_no_identifier_in_errors(tmp_path, caplog, pydicom_debug):
  del pydicom_debug  # Used for its effect.
  identifiers = _identifiers()
  folder = _private_folder(tmp_path / 'export')
  for name in ('mr.dcm', 'head.dcm', '1CT1.dcm'):
    os.remove(folder / name)
  caplog.clear()  # Preparing the files logged their values; the loader must not.
  with pytest.raises(DataError) as raised:
    dicom.load_dicom_folder(folder)
  message = ''.join(traceback.format_exception(raised.value))
  assert 'No usable image in DICOM folder' in message
  _assert_absent(identifiers, message, 'error')
  _assert_absent(identifiers, caplog.text, 'logs')


def test_relative_path_reporting_is_opt_in(tmp_path):
  folder = _private_folder(tmp_path / 'export')
  files = dicom.list_dicom_files(folder)
  overlay = pydicom.dcmread(get_testdata_file('examples_overlay.dcm'))
  patient_named = os.path.join(str(overlay.PatientName), f'{overlay.SOPInstanceUID}.dcm')
  assert files == ['1CT1.dcm', 'dose.dcm', 'head.dcm', 'mr.dcm', 'short.dcm', patient_named]

  default = dicom.load_dicom_folder(folder)
  assert default.report.source == 'DICOM folder'
  assert [s.path for s in default.report.skipped] == ['file #1', 'file #4', 'file #5']
  relative = dicom.load_dicom_folder(folder, skipped_paths=dicom.PathReport.RELATIVE)
  assert relative.report.source == str(folder)
  assert [s.path for s in relative.report.skipped] == ['dose.dcm', 'short.dcm', patient_named]
