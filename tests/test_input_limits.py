"""Input limits (data/limits.py): bombs, FIFOs and devices are skipped before anything is decoded.

Each refusal is a skip reason in the loader's report and the good files still load. The bombs
are built here without ever holding their inflated size: a compressed block of zeros, emitted
after a full flush, is repeated (the compressor starts afresh after a full flush, so the block
refers to nothing before it). Tests that could block on old code run under a deadline; those
that could exhaust memory run in a subprocess under an address-space cap (RLIMIT_AS), with the
loaders only (no TensorFlow).
"""

import contextlib
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib

import numpy as np
from PIL import Image
import pydicom
from pydicom import filebase
from pydicom import filewriter
from pydicom.data import get_testdata_file
import pytest

from tff_medical import categories
from tff_medical.data import dicom
from tff_medical.data import limits as limits_lib
from tff_medical.data import mednist
from tff_medical.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = limits_lib.MiB
GiB = limits_lib.GiB
_CHUNK = MiB


# --- Builders -------------------------------------------------------------------------------


def _deflate_with_zeros(head: bytes, zeros: int, tail: bytes = b'', wbits: int = -15) -> bytes:
  """Deflate of head + `zeros` zero bytes + tail, costing one MiB of compression work."""
  compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
  parts = [compressor.compress(head), compressor.flush(zlib.Z_FULL_FLUSH)]
  full, rest = divmod(zeros, _CHUNK)
  if full:
    parts.append((compressor.compress(bytes(_CHUNK)) + compressor.flush(zlib.Z_FULL_FLUSH)) * full)
  if rest:
    parts += [compressor.compress(bytes(rest)), compressor.flush(zlib.Z_FULL_FLUSH)]
  parts += [compressor.compress(tail), compressor.flush()]
  return b''.join(parts)


def _gzip_with_zeros(head: bytes, zeros: int, tail: bytes) -> bytes:
  crc = zlib.crc32(head)
  block = bytes(_CHUNK)
  for _ in range(zeros // _CHUNK):
    crc = zlib.crc32(block, crc)
  crc = zlib.crc32(tail, zlib.crc32(bytes(zeros % _CHUNK), crc))
  header = b'\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff'
  trailer = struct.pack('<II', crc, (len(head) + zeros + len(tail)) & 0xFFFFFFFF)
  return header + _deflate_with_zeros(head, zeros, tail) + trailer


def _jpeg(gray: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((64, 64), gray, np.uint8)).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
  """A valid 1x1 PNG whose header declares width x height (PIL reads the size from it)."""
  buffer = io.BytesIO()
  Image.new('L', (1, 1)).save(buffer, format='PNG')
  data = bytearray(buffer.getvalue())
  data[16:24] = struct.pack('>II', width, height)  # IHDR data starts at byte 16.
  data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))  # IHDR's CRC
  return bytes(data)


def _make_mednist(root, per_category=1) -> str:
  for i, category in enumerate(categories.CATEGORY_IDS):
    os.makedirs(os.path.join(root, category), exist_ok=True)
    for j in range(per_category):
      with open(os.path.join(root, category, f'{j:06d}.jpeg'), 'wb') as f:
        f.write(_jpeg(20 + 40 * i))
  return str(root)


def _tar_member(name: str, data: bytes = b'', **fields) -> bytes:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  for key, value in fields.items():
    setattr(info, key, value)
  return info.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)


def _mednist_tar_gz(path, extra_members: bytes = b'', zero_member: str = '',
                    zero_size: int = 0) -> str:
  """MedNIST/<category>/0.jpeg for each category, then `extra_members`, then a member of zeros."""
  head = b''.join(_tar_member(f'MedNIST/{c}/0.jpeg', _jpeg(20 + 40 * i))
                  for i, c in enumerate(categories.CATEGORY_IDS)) + extra_members
  tail = bytes(1024)  # End of archive.
  if zero_member:
    info = tarfile.TarInfo(zero_member)
    info.size = zero_size
    head += info.tobuf(tarfile.GNU_FORMAT)
    tail = bytes(-zero_size % 512) + tail
  with open(path, 'wb') as f:
    f.write(_gzip_with_zeros(head, zero_size, tail))
  return str(path)


def _dicom_dataset(rows: int, columns: int, **extra) -> pydicom.Dataset:
  ds = pydicom.Dataset()
  ds.Modality = 'CT'
  ds.BodyPartExamined = 'HEAD'
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.Rows = rows
  ds.Columns = columns
  ds.BitsAllocated = 16
  ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 0
  for keyword, value in extra.items():
    setattr(ds, keyword, value)
  return ds


def _deflated_dicom(rows: int, columns: int, gray: int = 0) -> bytes:
  """A Deflated Explicit VR Little Endian CT of rows x columns 16-bit pixels, all `gray`.

  With gray 0 the pixel data is zeros and the file is about a thousandth of its inflated size.
  """
  meta = pydicom.dataset.FileMetaDataset()
  meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
  meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
  meta_fp = filebase.DicomBytesIO()
  meta_fp.is_little_endian, meta_fp.is_implicit_VR = True, False
  filewriter.write_file_meta_info(meta_fp, meta, enforce_standard=True)
  body = filebase.DicomBytesIO()
  body.is_little_endian, body.is_implicit_VR = True, False
  filewriter.write_dataset(body, _dicom_dataset(rows, columns))
  length = rows * columns * 2
  pixel_header = struct.pack('<HH2sHI', 0x7FE0, 0x0010, b'OW', 0, length)
  if gray:
    deflated = _deflate_with_zeros(
        body.getvalue() + pixel_header + np.full(rows * columns, gray, '<u2').tobytes(), 0)
  else:
    deflated = _deflate_with_zeros(body.getvalue() + pixel_header, length)
  return bytes(128) + b'DICM' + meta_fp.getvalue() + deflated


def _native_dicom(path, rows: int, columns: int, **extra) -> str:
  """A CT whose header declares rows x columns (x frames) but whose pixel data is 64x64."""
  ds = _dicom_dataset(rows, columns, **extra)
  ds.PixelData = bytes(64 * 64 * 2)
  ds.file_meta = pydicom.dataset.FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
  ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  ds.save_as(path, enforce_file_format=True)
  return str(path)


class _Expired(BaseException):
  """Not an OSError nor an Exception, so that no loader can catch it as a bad file."""


@contextlib.contextmanager
def _deadline(seconds: int):
  """Fails the test instead of hanging it (a FIFO opened for reading blocks forever)."""

  def expire(*_):
    raise _Expired(f'took more than {seconds} s')

  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- The limits themselves ------------------------------------------------------------------


@pytest.mark.parametrize('field, value', [
    ('max_file_bytes', 0), ('max_image_pixels', -1), ('max_archive_bytes', 1.5),
    ('max_member_bytes', True), ('max_inflated_bytes', None)])
def test_invalid_limit_is_refused_naming_field_and_value(field, value):
  with pytest.raises(DataError) as error:
    limits_lib.InputLimits(**{field: value})
  assert str(error.value) == f'{field} must be a positive integer. Found {value!r}.'


def test_loaders_refuse_a_limits_argument_of_the_wrong_type(tmp_path):
  with pytest.raises(DataError, match='limits must be an InputLimits'):
    mednist.load_mednist(_make_mednist(tmp_path), limits={'max_file_bytes': 1})


def test_read_regular_file_refuses_fifo_device_and_oversized_file(tmp_path):
  os.mkfifo(tmp_path / 'fifo')
  (tmp_path / 'big').write_bytes(bytes(101))
  os.symlink('/dev/zero', tmp_path / 'zero')
  with _deadline(10):
    for name, reason in [('fifo', limits_lib.REASON_NOT_REGULAR),
                         ('zero', limits_lib.REASON_NOT_REGULAR),
                         ('big', limits_lib.REASON_FILE_TOO_LARGE),
                         ('absent', limits_lib.REASON_UNREADABLE_FILE)]:
      with pytest.raises(limits_lib.InputRefused) as refused:
        limits_lib.read_regular_file(str(tmp_path / name), 100)
      assert refused.value.reason == reason
  assert limits_lib.read_regular_file(str(tmp_path / 'big'), 101) == bytes(101)


# --- MedNIST folder -------------------------------------------------------------------------


def test_mednist_fifo_is_skipped_without_blocking(tmp_path):
  root = _make_mednist(tmp_path / 'MedNIST')
  os.mkfifo(os.path.join(root, 'Hand', 'pipe.jpeg'))
  with _deadline(20):
    data = mednist.load_mednist(root)
  assert len(data) == 6
  assert data.report.reasons() == {'not a regular file': 1}
  assert data.report.skipped[0].path == 'Hand/pipe.jpeg'


def test_mednist_file_above_max_file_bytes_is_skipped_unread(tmp_path):
  root = _make_mednist(tmp_path / 'MedNIST')
  big = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
  Image.fromarray(big).save(os.path.join(root, 'CXR', 'big.png'))
  size = os.path.getsize(os.path.join(root, 'CXR', 'big.png'))
  data = mednist.load_mednist(root, limits=limits_lib.InputLimits(max_file_bytes=size - 1))
  assert len(data) == 6
  assert data.report.reasons() == {'file larger than max_file_bytes': 1}
  assert len(mednist.load_mednist(root, limits=limits_lib.InputLimits(max_file_bytes=size))) == 7


def test_mednist_picture_above_max_image_pixels_is_skipped_before_decoding(tmp_path, monkeypatch):
  root = _make_mednist(tmp_path / 'MedNIST')
  with open(os.path.join(root, 'Hand', 'huge.png'), 'wb') as f:
    f.write(_png_declaring(9000, 9000))  # Above our 8192 x 8192, below PIL's guard.
  # Its IDAT holds one pixel: decoding it would fail as 'unreadable image', so the reason
  # below can only come from the header check.
  data = mednist.load_mednist(root)
  assert len(data) == 6
  assert data.report.reasons() == {'image larger than max_image_pixels': 1}

  def no_load(*args, **kwargs):
    raise AssertionError('an oversized image must not be decoded')

  declared = _png_declaring(9000, 9000)
  monkeypatch.setattr(Image.Image, 'load', no_load)
  with pytest.raises(limits_lib.InputRefused, match='image larger than max_image_pixels'):
    mednist.decode_image(declared)


def test_pil_decompression_bomb_guard_is_reported_as_such_not_as_corrupt(tmp_path):
  # 15000 x 15000 is above twice PIL's Image.MAX_IMAGE_PIXELS: PIL refuses it while opening.
  root = _make_mednist(tmp_path / 'MedNIST')
  with open(os.path.join(root, 'Hand', 'huge.png'), 'wb') as f:
    f.write(_png_declaring(15000, 15000))
  data = mednist.load_mednist(root)
  assert data.report.reasons() == {"over PIL's decompression-bomb limit": 1}


# --- MedNIST archive ------------------------------------------------------------------------


def test_archive_member_above_max_member_bytes_is_skipped_and_the_rest_loads(tmp_path):
  archive = _mednist_tar_gz(tmp_path / 'm.tar.gz', zero_member='MedNIST/Hand/bomb.jpeg',
                            zero_size=8 * MiB)
  assert os.path.getsize(archive) < 64 * 1024
  data = mednist.load_mednist(archive, limits=limits_lib.InputLimits(max_member_bytes=MiB))
  assert len(data) == 6
  assert [(s.path, s.reason) for s in data.report.skipped] == [
      ('MedNIST/Hand/bomb.jpeg', 'archive member larger than max_member_bytes')]


def test_archive_above_max_archive_bytes_is_refused_whole(tmp_path):
  archive = _mednist_tar_gz(tmp_path / 'm.tar.gz', zero_member='MedNIST/Hand/notes.txt',
                            zero_size=8 * MiB)
  with pytest.raises(DataError, match='refused: it holds more than max_archive_bytes=4194304'):
    mednist.load_mednist(archive, limits=limits_lib.InputLimits(max_archive_bytes=4 * MiB))
  assert len(mednist.load_mednist(archive)) == 6  # Within the default limits.


def test_archive_above_max_archive_members_is_refused_whole(tmp_path):
  archive = _mednist_tar_gz(tmp_path / 'm.tar.gz')
  with pytest.raises(DataError, match='more than max_archive_members=5 members'):
    mednist.load_mednist(archive, limits=limits_lib.InputLimits(max_archive_members=5))


def test_archive_with_an_oversized_extended_header_is_refused(tmp_path):
  # A GNU long name is read whole by tarfile before the member is returned.
  long_name = 'MedNIST/Hand/' + 'a' * (2 * MiB) + '.jpeg'
  archive = _mednist_tar_gz(tmp_path / 'm.tar.gz', extra_members=_tar_member(long_name))
  with pytest.raises(DataError, match='an extended header of 2097171 bytes'):
    mednist.load_mednist(archive)


def test_archive_links_and_devices_each_get_a_line_in_the_report(tmp_path):
  special = b''.join([
      _tar_member('MedNIST/Hand/link.jpeg', type=tarfile.SYMTYPE, linkname='/dev/zero'),
      _tar_member('MedNIST/Hand/hard.jpeg', type=tarfile.LNKTYPE,
                  linkname='MedNIST/Hand/0.jpeg'),
      _tar_member('MedNIST/CXR/dev.jpeg', type=tarfile.CHRTYPE, devmajor=1, devminor=5),
      _tar_member('MedNIST/CXR/pipe.png', type=tarfile.FIFOTYPE),
      _tar_member('MedNIST/CXR/link.txt', type=tarfile.SYMTYPE, linkname='../x'),
  ])
  data = mednist.load_mednist(_mednist_tar_gz(tmp_path / 'm.tar.gz', extra_members=special))
  assert len(data) == 6
  assert sorted((s.path, s.reason) for s in data.report.skipped) == [
      ('MedNIST/CXR/dev.jpeg', 'not a regular file'),
      ('MedNIST/CXR/link.txt', 'not an image file'),
      ('MedNIST/CXR/pipe.png', 'not a regular file'),
      ('MedNIST/Hand/hard.jpeg', 'not a regular file'),
      ('MedNIST/Hand/link.jpeg', 'not a regular file')]


def test_skipping_a_large_member_takes_seconds_not_minutes(tmp_path):
  # tarfile's own gzip stream skipped a member in 10 KiB steps, each copying what one deflate
  # step produced: about 150 ms a MiB of highly compressed zeros.
  archive = _mednist_tar_gz(tmp_path / 'm.tar.gz', zero_member='MedNIST/Hand/notes.txt',
                            zero_size=128 * MiB)
  start = time.monotonic()
  data = mednist.load_mednist(archive)
  assert time.monotonic() - start < 8
  assert len(data) == 6 and data.report.reasons() == {'not an image file': 1}


# --- MedNIST layout (issue 14, finding 7) ---------------------------------------------------


@pytest.mark.parametrize('as_archive', [False, True], ids=['folder', 'archive'])
def test_extra_top_level_folder_beside_mednist_is_reported_not_fatal(tmp_path, as_archive):
  root = tmp_path / 'data'
  _make_mednist(root / 'MedNIST')
  os.makedirs(root / '__MACOSX' / 'MedNIST' / 'Hand')
  (root / '__MACOSX' / 'MedNIST' / 'Hand' / '0.jpeg').write_bytes(b'resource fork')
  os.makedirs(root / 'extra')
  (root / 'extra' / '0.jpeg').write_bytes(_jpeg(0))
  (root / 'notes.txt').write_bytes(b'notes')
  source = str(root)
  if as_archive:
    source = str(tmp_path / 'data.tar.gz')
    with tarfile.open(source, 'w:gz') as archive:
      for name in sorted(os.listdir(root)):
        archive.add(root / name, arcname=name)
  data = mednist.load_mednist(source)
  assert len(data) == 6
  assert sorted((s.path, s.reason) for s in data.report.skipped) == [
      ('__MACOSX/', 'not in the MedNIST folder'),
      ('extra/', 'not in the MedNIST folder'),
      ('notes.txt', 'not in a category folder')]


def test_two_mednist_copies_side_by_side_is_an_error_naming_both(tmp_path):
  _make_mednist(tmp_path / 'MedNIST')
  _make_mednist(tmp_path / 'MedNIST_copy')
  with pytest.raises(DataError, match=r'several folders \(MedNIST/, MedNIST_copy/\); point '
                                      'data_dir at one of them'):
    mednist.load_mednist(tmp_path)


def test_mednist_source_that_is_a_fifo_is_an_error_not_a_hang(tmp_path):
  os.mkfifo(tmp_path / 'MedNIST.tar.gz')
  with _deadline(10), pytest.raises(DataError, match='neither a folder nor a regular file'):
    mednist.load_mednist(tmp_path / 'MedNIST.tar.gz')


# --- DICOM ----------------------------------------------------------------------------------


def _dicom_folder(root) -> str:
  os.makedirs(root, exist_ok=True)
  ct = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
  ct.BodyPartExamined = 'CHEST'
  ct.save_as(os.path.join(root, 'good.dcm'))
  return str(root)


def test_dicom_fifo_is_skipped_without_blocking(tmp_path):
  root = _dicom_folder(tmp_path)
  os.mkfifo(os.path.join(root, 'pipe.dcm'))
  with _deadline(20):
    data = dicom.load_dicom_folder(root, skipped_paths=dicom.PathReport.RELATIVE)
  assert len(data) == 1
  assert [(s.path, s.reason) for s in data.report.skipped] == [('pipe.dcm', 'not a regular file')]


@pytest.mark.parametrize('rows, columns, extra, reason', [
    (65535, 65535, {}, 'image larger than max_image_pixels'),
    (512, 512, {'NumberOfFrames': 5000}, 'DICOM pixel data larger than max_dicom_pixel_bytes'),
    (8192, 8192, {'SamplesPerPixel': 3, 'PhotometricInterpretation': 'RGB',
                  'PlanarConfiguration': 0}, 'image larger than max_image_pixels'),
], ids=['rows_columns', 'frames', 'samples'])
def test_dicom_header_above_the_pixel_limits_is_skipped_before_decoding(tmp_path, rows, columns,
                                                                         extra, reason):
  root = _dicom_folder(tmp_path)
  _native_dicom(os.path.join(root, 'huge.dcm'), rows, columns, **extra)
  data = dicom.load_dicom_folder(root)
  assert len(data) == 1
  assert data.report.reasons() == {reason: 1}
  with pytest.raises(dicom.UnusableDicomError) as error:
    dicom.read_dicom_image(os.path.join(root, 'huge.dcm'))
  assert error.value.reason == reason


def test_dicom_pixel_limits_are_configurable(tmp_path):
  root = _dicom_folder(tmp_path)  # CT_small: 128 x 128
  tight = limits_lib.InputLimits(max_image_pixels=127 * 128)
  with pytest.raises(DataError, match='1 image larger than max_image_pixels'):
    dicom.load_dicom_folder(root, limits=tight)
  assert len(dicom.load_dicom_folder(root, limits=limits_lib.InputLimits(
      max_image_pixels=128 * 128))) == 1


def test_deflated_dicom_above_max_inflated_bytes_is_skipped_before_pydicom_inflates_it(
    tmp_path, monkeypatch):
  root = _dicom_folder(tmp_path)
  bomb = _deflated_dicom(4096, 4096)  # 32 MiB of pixel data in about 33 KB
  assert len(bomb) < 64 * 1024
  (tmp_path / 'bomb.dcm').write_bytes(bomb)
  inflate = zlib.decompress

  def bounded_inflate(data, *args, **kwargs):
    out = inflate(data, *args, **kwargs)
    assert len(out) < 2 * MiB, 'pydicom inflated the bomb'
    return out

  monkeypatch.setattr(zlib, 'decompress', bounded_inflate)
  data = dicom.load_dicom_folder(root, limits=limits_lib.InputLimits(max_inflated_bytes=MiB))
  assert len(data) == 1
  assert data.report.reasons() == {'deflated DICOM larger than max_inflated_bytes': 1}


def test_deflated_dicom_within_the_limits_still_loads(tmp_path):
  (tmp_path / 'ok.dcm').write_bytes(_deflated_dicom(64, 64, gray=1000))
  data = dicom.load_dicom_folder(tmp_path)
  assert len(data) == 1 and not data.report.skipped
  assert data.category_counts()['HeadCT'] == 1
  # The builder is checked against pydicom: the same file read directly gives the same pixels.
  ds = pydicom.dcmread(tmp_path / 'ok.dcm')
  assert ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
  assert ds.pixel_array.shape == (64, 64) and int(ds.pixel_array.max()) == 1000


def test_deflated_dicom_of_the_issue_is_refused_by_its_header(tmp_path):
  # Issue 14: 133 KB of deflated zeros used 1.8 GB (about 26 bytes a pixel).
  (tmp_path / 'bomb.dcm').write_bytes(_deflated_dicom(8400, 8400))
  assert os.path.getsize(tmp_path / 'bomb.dcm') < 200 * 1024
  with pytest.raises(dicom.UnusableDicomError) as error:
    dicom.read_dicom_image(str(tmp_path / 'bomb.dcm'))
  assert error.value.reason == 'image larger than max_image_pixels'


# --- Everything together under a memory cap -------------------------------------------------

_LOAD_UNDER_CAP = textwrap.dedent('''
    import json, resource, sys, time
    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from tff_medical.data import dicom, mednist
    out = {}
    for name, path in zip(sys.argv[2::2], sys.argv[3::2]):
      start = time.monotonic()
      if name.startswith('dicom'):
        data = dicom.load_dicom_folder(path, skipped_paths=dicom.PathReport.RELATIVE)
      else:
        data = mednist.load_mednist(path)
      out[name] = dict(loaded=len(data), seconds=time.monotonic() - start,
                       skipped=sorted((s.path, s.reason) for s in data.report.skipped))
    out['peak_rss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))
''')


def _load_under_cap(cap: int, timeout: int, **sources) -> dict:
  args = [str(cap)]
  for name, path in sources.items():
    args += [name, str(path)]
  env = dict(os.environ, PYTHONPATH=REPO, OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1')
  done = subprocess.run([sys.executable, '-c', _LOAD_UNDER_CAP, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_fifo_and_dev_zero_links_are_skipped_under_a_memory_cap(tmp_path):
  """Old code hung on the FIFO and read /dev/zero until memory ran out."""
  root = _make_mednist(tmp_path / 'MedNIST')
  os.mkfifo(os.path.join(root, 'Hand', 'pipe.jpeg'))
  os.symlink('/dev/zero', os.path.join(root, 'CXR', 'zero.png'))
  folder = _dicom_folder(tmp_path / 'dicom')
  os.mkfifo(os.path.join(folder, 'pipe.dcm'))
  os.symlink('/dev/zero', os.path.join(folder, 'zero.dcm'))
  result = _load_under_cap(2 * GiB, 60, mednist=root, dicom=folder)
  assert result['mednist']['loaded'] == 6
  assert result['mednist']['skipped'] == [['CXR/zero.png', 'not a regular file'],
                                          ['Hand/pipe.jpeg', 'not a regular file']]
  assert result['dicom']['loaded'] == 1
  assert result['dicom']['skipped'] == [['pipe.dcm', 'not a regular file'],
                                        ['zero.dcm', 'not a regular file']]


@pytest.mark.slow
def test_bombs_are_skipped_under_a_4_gib_cap_within_seconds(tmp_path):
  """Issue 14, finding 4, at full size, with the default limits."""
  root = _make_mednist(tmp_path / 'MedNIST')
  os.mkfifo(os.path.join(root, 'Hand', 'pipe.jpeg'))
  os.symlink('/dev/zero', os.path.join(root, 'CXR', 'zero.png'))
  with open(os.path.join(root, 'HeadCT', 'huge.png'), 'wb') as f:
    f.write(_png_declaring(15000, 15000))
  with open(os.path.join(root, 'HeadCT', 'large.png'), 'wb') as f:
    f.write(_png_declaring(9000, 9000))
  archive = _mednist_tar_gz(tmp_path / 'bomb.tar.gz', zero_member='MedNIST/Hand/bomb.jpeg',
                            zero_size=GiB)
  assert os.path.getsize(archive) < 1.1 * MiB  # The issue's 1 MB tar.gz with a 1 GiB member.
  folder = _dicom_folder(tmp_path / 'dicom')
  with open(os.path.join(folder, 'issue.dcm'), 'wb') as f:
    f.write(_deflated_dicom(8400, 8400))  # ~137 KB, inflates to 141 MB
  with open(os.path.join(folder, 'largest.dcm'), 'wb') as f:
    f.write(_deflated_dicom(46340, 46340))  # ~4 MB, inflates to 4 GiB (the format's maximum)
  os.mkfifo(os.path.join(folder, 'pipe.dcm'))
  os.symlink('/dev/zero', os.path.join(folder, 'zero.dcm'))

  result = _load_under_cap(4 * GiB, 120, mednist_folder=root, mednist_archive=archive,
                           dicom=folder)
  assert result['mednist_folder']['loaded'] == 6
  assert result['mednist_folder']['skipped'] == [
      ['CXR/zero.png', 'not a regular file'], ['Hand/pipe.jpeg', 'not a regular file'],
      ['HeadCT/huge.png', "over PIL's decompression-bomb limit"],
      ['HeadCT/large.png', 'image larger than max_image_pixels']]
  assert result['mednist_archive']['loaded'] == 6
  assert result['mednist_archive']['skipped'] == [
      ['MedNIST/Hand/bomb.jpeg', 'archive member larger than max_member_bytes']]
  assert result['dicom']['loaded'] == 1
  assert result['dicom']['skipped'] == [
      ['issue.dcm', 'image larger than max_image_pixels'],
      ['largest.dcm', 'deflated DICOM larger than max_inflated_bytes'],
      ['pipe.dcm', 'not a regular file'],
      ['zero.dcm', 'not a regular file']]
  assert all(r['seconds'] < 30 for k, r in result.items() if k != 'peak_rss')
  assert result['peak_rss'] < 2 * GiB


@pytest.mark.parametrize('mode', ['w', 'w:gz', 'w:bz2', 'w:xz'])
def test_archive_in_each_compression_loads_like_the_folder(tmp_path, mode):
  # The loader detects the compression itself (to read it in bounded steps), as 'r|*' did.
  folder = _make_mednist(tmp_path / 'MedNIST', per_category=2)
  archive = str(tmp_path / 'MedNIST.tar')
  with tarfile.open(archive, mode) as f:
    f.add(folder, arcname='MedNIST')
  from_archive = mednist.load_mednist(archive)
  np.testing.assert_array_equal(from_archive.images, mednist.load_mednist(folder).images)
  assert not from_archive.report.skipped
  with open(archive, 'rb') as f:
    data = f.read()
  with open(archive, 'wb') as f:
    f.write(data[:len(data) * 3 // 4])
  with pytest.raises(DataError):  # Each decompressor's own error for a cut file is caught.
    mednist.load_mednist(archive)
