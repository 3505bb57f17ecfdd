"""The PACS source (data/pacs.py): settings, credentials, cache, retries and messages with an
in-process fake DICOMweb client; then, in the end-to-end tier, a real Orthanc server."""

import io
import logging as std_logging
import os
import stat
import subprocess
import sys

import numpy as np
import pydicom
from pydicom import data as pydicom_data
import pytest
import requests

from tff_medical import categories
from tff_medical.data import dicom
from tff_medical.data import pacs
from tff_medical.data import sources
from tff_medical.errors import ConfigError
from tff_medical.errors import DataError
from tff_medical.training import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = 'site-user:s3cr3t-PASSWORD'


def _private_file(path, text):
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  return str(path)


def _settings(tmp_path, **overrides):
  values = dict(url='http://127.0.0.1:1/dicom-web', cache_dir=str(tmp_path / 'cache'),
                credentials_file=_private_file(tmp_path / 'credentials', SECRET + '\n')
                if not (tmp_path / 'credentials').exists() else str(tmp_path / 'credentials'),
                backoff_seconds=0.0)
  values.update(overrides)
  return pacs.PacsSettings(**values)


# --- Settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize('overrides, message', [
    ({'url': ''}, "pacs.url must be set for dataset 'pacs'"),
    ({'url': 'ftp://pacs/dicom-web'}, 'pacs.url must be an http'),
    ({'url': 'https://user:pw@pacs.example.org/dicom-web'}, 'must not hold credentials'),
    ({'url': 'http://pacs.example.org/dicom-web'}, 'must use https to send credentials'),
    ({'cache_dir': ''}, 'pacs.cache_dir must be set'),
    ({'credentials_env': 'PACS_TOKEN'}, 'needs exactly one of'),
    ({'credentials_file': ''}, 'needs exactly one of'),
    ({'auth': 'kerberos'}, 'pacs.auth must be one of basic, bearer, none'),
    ({'auth': 'none'}, "need pacs.auth 'basic' or 'bearer'"),
    ({'modalities': 'CT,M R;'}, 'pacs.modalities must be DICOM modality codes'),
    ({'study_date': '2020-01-01'}, 'pacs.study_date must be a DICOM date range'),
    ({'study_date': '-'}, 'pacs.study_date must be a DICOM date range'),
    ({'page_size': 0}, 'pacs.page_size must be a positive integer'),
    ({'max_attempts': True}, 'pacs.max_attempts must be a positive integer'),
    ({'backoff_seconds': -1}, 'pacs.backoff_seconds must be a non-negative number'),
], ids=['no_url', 'scheme', 'credentials_in_url', 'cleartext_remote', 'no_cache', 'two_sources',
        'no_source', 'unknown_auth', 'credentials_without_auth', 'modality', 'date', 'date_dash',
        'page_size', 'attempts_bool', 'backoff'])
def test_bad_settings_are_one_config_error(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    _settings(tmp_path, **overrides)


def test_good_settings_parse_modalities_and_date_ranges(tmp_path):
  settings = _settings(tmp_path, modalities='ct, mr', study_date='20200101-')
  assert settings.modalities == ('CT', 'MR') and settings.auth is pacs.Auth.BASIC
  for value in ('20200101', '20200101-20231231', '-20231231'):
    assert _settings(tmp_path, study_date=value).study_date == value
  # Loopback may be plain http; a remote host without credentials too.
  assert _settings(tmp_path, url='http://localhost:8042/dicom-web').url
  assert pacs.PacsSettings(url='http://pacs.example.org/dicom-web', cache_dir='c',
                           auth='none').auth is pacs.Auth.NONE


def test_config_has_the_pacs_fields_and_validates_them():
  config = config_lib.base_config()
  assert set(config.pacs.to_dict()) == {f.name for f in pacs.dataclasses.fields(
      pacs.PacsSettings)}
  config.dataset = 'pacs'
  with pytest.raises(ConfigError, match='pacs.url must be set'):
    config_lib.validate(config)
  config.pacs.url = 'https://pacs.example.org/dicom-web'
  config.pacs.cache_dir = '/var/cache/site'
  config.pacs.credentials_env = 'PACS_CREDENTIALS'
  config_lib.validate(config)
  config.data_dir = '/some/folder'
  with pytest.raises(ConfigError, match='data_dir must be empty'):
    config_lib.validate(config)
  with pytest.raises(ConfigError, match='unknown fields'):
    pacs.PacsSettings.from_config(dict(config.pacs.to_dict(), password='x'))


def test_a_resumed_run_must_ask_the_same_pacs_the_same_query():
  from tff_medical.privacy import policy as policy_lib  # pylint: disable=g-import-not-at-top
  from tff_medical.privacy import sampling as sampling_lib  # pylint: disable=g-import-not-at-top
  from tff_medical.training import program  # pylint: disable=g-import-not-at-top

  class Partition:
    def fingerprint(self):
      return {'clients': 2}

  class Unit:
    def fingerprint_privacy(self):
      return {'dp': True}

  def dataset_section(**pacs_fields):
    config = config_lib.base_config()
    config.dataset = 'pacs'
    config.pacs.update({'url': 'https://pacs.example.org/dicom-web',
                        'credentials_file': '/secret/a', **pacs_fields})
    # pylint: disable-next=protected-access
    return program._fingerprint(config, policy_lib.load_policy(policy_lib.DEFAULT_POLICY_PATH),
                                sampling_lib.SamplingSpec('poisson', 2, 1), Partition(),
                                Unit())['dataset']

  base = dataset_section()
  assert dataset_section(credentials_file='/secret/b') == base  # Credentials are not data.
  assert dataset_section(url='https://other.example.org/dicom-web') != base
  assert dataset_section(modalities='CT') != base
  assert dataset_section(study_date='20200101-20201231') != base
  assert dataset_section(called_ae='OTHER_PACS') != base
  assert 'secret' not in repr(base)


def test_registry_entry_reads_the_pacs_settings(monkeypatch):
  source = sources.get('pacs')
  assert source.remote and not source.generated and not source.needs_data_dir
  calls = []
  monkeypatch.setattr(pacs, 'load_pacs', lambda settings: calls.append(settings) or 'loaded')
  assert sources.load('pacs', data_dir='', pacs={'url': 'x'}) == 'loaded'
  assert calls == [{'url': 'x'}]
  with pytest.raises(ConfigError, match="dataset 'pacs' needs the pacs settings"):
    pacs.PacsSettings.from_config(None)


# --- Credentials and study list ---------------------------------------------------------------


def test_credentials_file_must_be_owner_only_and_is_never_quoted(tmp_path):
  path = tmp_path / 'loose'
  path.write_text(SECRET)
  os.chmod(path, 0o644)
  settings = _settings(tmp_path, credentials_file=str(path))
  with pytest.raises(ConfigError, match='readable by other users .*chmod 600'):
    pacs.DicomWebClient(settings)
  os.chmod(path, 0o600)
  path.write_text('no-colon-here')
  with pytest.raises(ConfigError, match="must hold one line 'user:password'") as error:
    pacs.DicomWebClient(settings)
  assert 'no-colon-here' not in str(error.value)
  with pytest.raises(ConfigError, match='Cannot read pacs.credentials_file'):
    pacs.DicomWebClient(_settings(tmp_path, credentials_file=str(tmp_path / 'missing')))


def test_credentials_from_environment_basic_and_bearer(tmp_path, monkeypatch):
  monkeypatch.delenv('TFF_TEST_PACS', raising=False)
  settings = _settings(tmp_path, credentials_file='', credentials_env='TFF_TEST_PACS')
  with pytest.raises(ConfigError, match='TFF_TEST_PACS .* is not set'):
    pacs.DicomWebClient(settings)
  monkeypatch.setenv('TFF_TEST_PACS', SECRET)
  client = pacs.DicomWebClient(settings)
  # pylint: disable=protected-access
  assert client._client._session.auth == tuple(SECRET.split(':', 1))
  assert client._client._session.trust_env is False
  monkeypatch.setenv('TFF_TEST_PACS', 'token-abc')
  bearer = pacs.DicomWebClient(_settings(tmp_path, credentials_file='', auth='bearer',
                                     credentials_env='TFF_TEST_PACS'))
  assert bearer._client._session.headers['Authorization'] == 'Bearer token-abc'
  assert bearer._client._session.auth is None


def test_study_list_file_lines_are_uids(tmp_path):
  path = tmp_path / 'studies.txt'
  path.write_text('# studies to train on\n1.2.3.4\n\n1.2.3.5  # second\n')
  # pylint: disable=protected-access
  assert pacs._study_list(_settings(tmp_path, study_list_file=str(path))) == ['1.2.3.4',
                                                                             '1.2.3.5']
  path.write_text('1.2.3.4\nDOE^JOHN\n')
  with pytest.raises(ConfigError, match='line 2 is not a Study Instance UID') as error:
    pacs._study_list(_settings(tmp_path, study_list_file=str(path)))
  assert 'DOE' not in str(error.value)
  path.write_text('# nothing\n')
  with pytest.raises(ConfigError, match='lists no study'):
    pacs._study_list(_settings(tmp_path, study_list_file=str(path)))


# --- Cache ------------------------------------------------------------------------------------


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def test_cache_is_owner_only_and_named_by_keyed_pseudonyms(tmp_path):
  cache = pacs.InstanceCache(str(tmp_path / 'cache'))
  uids = ('1.2.840.99.1', '1.2.840.99.1.2', '1.2.840.99.1.2.3')
  name = cache.pseudonym(*uids)
  assert name == cache.pseudonym(*uids) and len(name) == 32
  assert name != cache.pseudonym(uids[0], uids[1], '1.2.840.99.1.2.4')
  # Another cache (another key) gives another name: the name alone links to nothing.
  assert name != pacs.InstanceCache(str(tmp_path / 'other')).pseudonym(*uids)
  # The same folder again keeps its key: names are stable across runs.
  assert pacs.InstanceCache(str(tmp_path / 'cache')).pseudonym(*uids) == name
  image = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
  cache.put_image(name, image)
  cache.put_skip('f' * 32, dicom.REASON_BAD_PIXELS)
  cache.put_skip('e' * 32, pacs.REASON_RETRIEVE_FAILED)  # Transient: never cached.
  got, reason = cache.get(name)
  np.testing.assert_array_equal(got, image)
  assert reason is None
  assert cache.get('f' * 32) == (None, dicom.REASON_BAD_PIXELS)
  assert cache.get('e' * 32) == (None, None) and cache.get('0' * 32) == (None, None)
  for directory, _, files in os.walk(tmp_path / 'cache'):
    assert _mode(directory) == 0o700, directory
    for f in files:
      assert _mode(os.path.join(directory, f)) == 0o600, f
      assert not any(u in f for u in uids)
  # A damaged cached image is a miss (retrieved again), never an error.
  path = tmp_path / 'cache' / 'images' / f'{name}.npy'
  path.write_bytes(b'not numpy')
  assert cache.get(name) == (None, None)


def test_cache_folder_others_can_read_is_refused(tmp_path):
  folder = tmp_path / 'shared'
  folder.mkdir(mode=0o755)
  os.chmod(folder, 0o755)
  with pytest.raises(ConfigError, match='nobody else can read or write .*chmod 700'):
    pacs.InstanceCache(str(folder))
  os.chmod(folder, 0o700)
  pacs.InstanceCache(str(folder))
  (folder / 'key').write_bytes(b'short')
  with pytest.raises(ConfigError, match='is damaged'):
    pacs.InstanceCache(str(folder))


# --- The loader with a fake DICOMweb client ----------------------------------------------------


CANARY = 'CANARY^PATIENT^7731'


def _instance_bytes(modality, uid, rows=None):
  ds = pydicom.dcmread(pydicom_data.get_testdata_file('CT_small.dcm'))
  ds.PatientName = CANARY
  ds.Modality = modality
  ds.SOPInstanceUID = uid
  if rows:
    ds.Rows = rows  # Pixel data now too short for the header: a corrupt instance.
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def _http_error(status):
  response = requests.Response()
  response.status_code = status
  return requests.exceptions.HTTPError(f'{status} for url: /studies/1.2.3/{CANARY}',
                                       response=response)


class FakeDicomWeb:
  """The three dicomweb-client calls the loader makes, over an in-memory PACS.

  `series`: [(study, series, modality, body part, description, [sop uids])]; `failures`:
  {sop uid: [exceptions raised by successive retrievals]}; `query_failures`: exceptions
  raised by successive series queries.
  """

  def __init__(self, series, failures=None, query_failures=None, corrupt=()):
    self.series = series
    self.failures = failures or {}
    self.query_failures = list(query_failures or [])
    self.corrupt = set(corrupt)
    self.retrieved = []
    self.queries = []

  def search_for_series(self, study_instance_uid=None, fields=None, search_filters=None,
                        limit=None, offset=None):
    self.queries.append(dict(fields=fields, filters=search_filters, study=study_instance_uid))
    if self.query_failures:
      raise self.query_failures.pop(0)
    rows = []
    for study, series, modality, body_part, description, sops in self.series:
      if modality != search_filters['Modality']:
        continue
      if study_instance_uid and study != study_instance_uid:
        continue
      rows.append({'0020000D': {'vr': 'UI', 'Value': [study]},
                   '0020000E': {'vr': 'UI', 'Value': [series]},
                   '00080060': {'vr': 'CS', 'Value': [modality]},
                   '00180015': {'vr': 'CS', 'Value': [body_part]} if body_part else {'vr': 'CS'},
                   '00081030': {'vr': 'LO', 'Value': [description]},
                   '00201209': {'vr': 'IS', 'Value': [len(sops)]},
                   # What a PACS may send unasked: must go no further.
                   '00100010': {'vr': 'PN', 'Value': [{'Alphabetic': CANARY}]}})
    return rows[offset:offset + limit]

  def search_for_instances(self, study_instance_uid, series_instance_uid, fields=None,
                           limit=None, offset=None):
    for _, series, _, _, _, sops in self.series:
      if series == series_instance_uid:
        return [{'00080018': {'vr': 'UI', 'Value': [s]}} for s in sops][offset:offset + limit]
    return []

  def retrieve_instance(self, study, series, sop, media_types=None):
    failures = self.failures.get(sop)
    if failures:
      raise failures.pop(0)
    self.retrieved.append(sop)
    modality = next(m for _, se, m, _, _, _ in self.series if se == series)
    return pydicom.dcmread(io.BytesIO(_instance_bytes(
        modality, sop, rows=512 if sop in self.corrupt else None)))


def _pacs(n_head=3):
  return [
      ('1.9.1', '1.9.1.1', 'CT', 'HEAD', '', [f'1.9.1.1.{i}' for i in range(n_head)]),
      ('1.9.2', '1.9.2.1', 'CT', '', 'CT CHEST PE PROTOCOL', ['1.9.2.1.1', '1.9.2.1.2']),
      ('1.9.3', '1.9.3.1', 'DX', 'HAND', '', ['1.9.3.1.1']),
      ('1.9.4', '1.9.4.1', 'MR', 'KNEE', '', ['1.9.4.1.1', '1.9.4.1.2']),  # No rule maps it.
  ]


def _load(tmp_path, fake, **overrides):
  settings = _settings(tmp_path, **overrides)
  sleeps = []
  client = pacs.DicomWebClient(settings, web_client=fake, sleep=sleeps.append)
  return pacs.load_pacs(settings, client=client), sleeps


def test_series_are_categorized_by_the_folder_loaders_mapping(tmp_path):
  fake = FakeDicomWeb(_pacs())
  loaded, _ = _load(tmp_path, fake)
  counts = loaded.category_counts()
  assert counts == {**{c: 0 for c in categories.CATEGORY_IDS},
                    'HeadCT': 3, 'ChestCT': 2, 'Hand': 1}
  assert loaded.report.reasons() == {dicom.REASON_NO_CATEGORY: 2}
  assert [s.path for s in loaded.report.skipped] == ['instance #6', 'instance #7']
  # The unmapped series is never retrieved; only the mapping's fields are asked for.
  assert sorted(fake.retrieved) == sorted(s for row in _pacs()[:3] for s in row[5])
  assert {q['filters']['Modality'] for q in fake.queries} == {'CT', 'MR', 'CR', 'DX'}
  assert all(set(q['fields']) == {'BodyPartExamined', 'StudyDescription', 'SeriesDescription',
                                  'NumberOfSeriesRelatedInstances'} for q in fake.queries)
  # Pixels are the folder loader's: the same image read_dicom_image gives for the file.
  expected = dicom.read_dicom_image(io.BytesIO(_instance_bytes('CT', '1.9.1.1.0')))
  assert any(np.array_equal(image, expected) for image in loaded.images)
  # The order does not follow the PACS's (QIDO promises none): a resumed run gets the same data.
  reordered, _ = _load(tmp_path, FakeDicomWeb(_pacs()[::-1]))
  np.testing.assert_array_equal(reordered.images, loaded.images)
  np.testing.assert_array_equal(reordered.labels, loaded.labels)


def test_second_run_reads_the_cache_and_retrieves_nothing(tmp_path):
  first = FakeDicomWeb(_pacs(), corrupt={'1.9.1.1.2'})
  loaded, _ = _load(tmp_path, first)
  assert len(first.retrieved) == 6 and loaded.report.reasons()[dicom.REASON_BAD_PIXELS] == 1
  second = FakeDicomWeb(_pacs(), corrupt={'1.9.1.1.2'})
  again, _ = _load(tmp_path, second)
  assert second.retrieved == []  # The corrupt one too: its reason is cached.
  np.testing.assert_array_equal(again.images, loaded.images)
  np.testing.assert_array_equal(again.labels, loaded.labels)
  assert '0 retrieved, 6 from cache' in again.report.summary()
  # A new instance in a series is retrieved, alone.
  third = FakeDicomWeb(_pacs(n_head=4), corrupt={'1.9.1.1.2'})
  _load(tmp_path, third)
  assert third.retrieved == ['1.9.1.1.3']


def test_failed_retrieval_is_retried_with_backoff_then_reported_and_skipped(tmp_path):
  fake = FakeDicomWeb(_pacs(), failures={
      '1.9.1.1.0': [requests.exceptions.ConnectionError('refused'), _http_error(503)],
      '1.9.1.1.1': [requests.exceptions.Timeout('slow')] * 4,
      '1.9.2.1.1': [_http_error(404)],
  })
  loaded, sleeps = _load(tmp_path, fake, backoff_seconds=0.5, max_attempts=4)
  assert '1.9.1.1.0' in fake.retrieved  # Third try worked.
  assert loaded.report.reasons() == {pacs.REASON_RETRIEVE_FAILED: 1, pacs.REASON_NOT_FOUND: 1,
                                     dicom.REASON_NO_CATEGORY: 2}
  # Exponential backoff: 0.5, 1 for the first; 0.5, 1, 2 for the one that never worked.
  assert sorted(sleeps) == sorted([0.5, 1.0, 0.5, 1.0, 2.0])
  assert len(loaded) == 4
  # The failed one is not cached as failed: the next run tries it again and gets it.
  retry = FakeDicomWeb(_pacs())
  again, _ = _load(tmp_path, retry)
  assert sorted(retry.retrieved) == ['1.9.1.1.1', '1.9.2.1.1'] and len(again) == 6


@pytest.mark.parametrize('fake, message, error', [
    (FakeDicomWeb(_pacs(), query_failures=[_http_error(401)]),
     r'refused the credentials \(HTTP 401\): check pacs.auth', ConfigError),
    (FakeDicomWeb(_pacs(), query_failures=[requests.exceptions.ConnectionError('x')] * 4),
     r'is unreachable \(no connection after 4 attempts\): check pacs.url', DataError),
    (FakeDicomWeb(_pacs(), query_failures=[requests.exceptions.SSLError('x')]),
     r"not trusted: set pacs.ca_bundle to the hospital's CA bundle", ConfigError),
    (FakeDicomWeb(_pacs(), query_failures=[_http_error(400)]),
     r'refused the query \(HTTP 400\): is pacs.url its DICOMweb root', DataError),
    (FakeDicomWeb([]), r'the query \(modalities CR, CT, DX, MR\) matched no series', DataError),
    (FakeDicomWeb(_pacs()[3:]), r'gave no usable image.*2 no category for metadata', DataError),
], ids=['wrong_credentials', 'unreachable', 'untrusted_tls', 'refused_query', 'empty_query',
        'nothing_usable'])
def test_each_failure_is_one_clear_message_quoting_nothing(tmp_path, fake, message, error):
  _assert_one_clear_message(lambda: _load(tmp_path, fake), error, message)


def _assert_one_clear_message(load, error, message):
  with pytest.raises(error, match=message) as raised:
    load()
  text = str(raised.value)
  assert '\n' not in text and CANARY not in text and '1.9.' not in text


def test_a_failed_later_query_is_reported_and_the_rest_loads(tmp_path):
  # CR answers (empty), then CT fails 4 times: reported; DX and MR still load.
  fake = FakeDicomWeb(_pacs(), query_failures=[])
  calls = {'n': 0}
  original = fake.search_for_series

  def flaky(**kwargs):
    calls['n'] += 1
    if kwargs['search_filters']['Modality'] == 'CT':
      raise _http_error(500)
    return original(**kwargs)
  fake.search_for_series = flaky
  loaded, _ = _load(tmp_path, fake)
  assert loaded.report.reasons()[pacs.REASON_QUERY_FAILED] == 1
  assert loaded.category_counts()['Hand'] == 1 and loaded.category_counts()['HeadCT'] == 0


def test_query_filter_reaches_the_query(tmp_path):
  studies = tmp_path / 'studies.txt'
  studies.write_text('1.9.1\n1.9.3\n')
  fake = FakeDicomWeb(_pacs())
  loaded, _ = _load(tmp_path, fake, modalities='CT,DX', study_date='20200101-20201231',
                    study_list_file=str(studies))
  assert {(q['filters']['Modality'], q['study']) for q in fake.queries} == {
      ('CT', '1.9.1'), ('CT', '1.9.3'), ('DX', '1.9.1'), ('DX', '1.9.3')}
  assert all(q['filters']['StudyDate'] == '20200101-20201231' for q in fake.queries)
  assert loaded.category_counts()['HeadCT'] == 3 and loaded.category_counts()['ChestCT'] == 0


def test_paging_covers_every_result_once(tmp_path):
  fake = FakeDicomWeb(_pacs(n_head=7))
  loaded, _ = _load(tmp_path, fake, page_size=2)
  assert loaded.category_counts()['HeadCT'] == 7 and len(set(fake.retrieved)) == len(
      fake.retrieved) == 10


def test_no_header_value_reaches_logs_report_or_cache(tmp_path, caplog):
  std_logging.getLogger('dicomweb_client').setLevel(std_logging.DEBUG)
  caplog.set_level(std_logging.DEBUG)
  fake = FakeDicomWeb(_pacs(), failures={'1.9.1.1.0': [_http_error(503)]})
  loaded, _ = _load(tmp_path, fake)
  text = caplog.text + loaded.report.summary() + repr(loaded.report.skipped)
  for directory, _, files in os.walk(tmp_path / 'cache'):
    for f in files:
      text += f
      with open(os.path.join(directory, f), 'rb') as handle:
        text += handle.read().decode('latin-1')
  assert '1.9.1.1.0' in fake.retrieved  # Retried after the 503: its failure was handled.
  for secret in (CANARY, '1.9.1.1', '1.9.2', SECRET.split(':')[1]):
    assert secret not in text, secret


def test_unreachable_real_port_is_one_message(tmp_path):
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  settings = _settings(tmp_path, url=f'http://127.0.0.1:{port}/dicom-web', max_attempts=2,
                       backoff_seconds=0.01, timeout_seconds=5)
  with pytest.raises(DataError, match=r'is unreachable \(no connection after 2 attempts\)'):
    pacs.load_pacs(settings)


# --- DIMSE (C-FIND, C-GET) with a fake association ---------------------------------------------


def _dimse_settings(tmp_path, **overrides):
  values = dict(url='dicom://127.0.0.1:11112', cache_dir=str(tmp_path / 'cache'),
                protocol='dimse', called_ae='PACS', calling_ae='TFF-SITE', backoff_seconds=0.0)
  values.update(overrides)
  return pacs.PacsSettings(**values)


@pytest.mark.parametrize('overrides, message', [
    ({'protocol': 'dicom'}, 'pacs.protocol must be one of dicomweb, dimse'),
    ({'url': 'http://127.0.0.1:8042/dicom-web'}, r'pacs.url must be dicom://HOST:PORT'),
    ({'url': 'dicom://127.0.0.1'}, r'pacs.url must be dicom://HOST:PORT'),
    ({'url': 'dicom://127.0.0.1:port'}, r'pacs.url must be dicom://HOST:PORT'),
    ({'url': 'dicom://127.0.0.1:104/studies'}, r'pacs.url must be dicom://HOST:PORT'),
    ({'called_ae': ''}, r'pacs.called_ae must be an AE title'),
    ({'calling_ae': 'A' * 17}, r'pacs.calling_ae must be an AE title'),
    ({'calling_ae': 'SITE\\A'}, r'pacs.calling_ae must be an AE title'),
    ({'called_ae': '   '}, r'pacs.called_ae must be an AE title'),
    ({'credentials_env': 'PACS_TOKEN'}, 'DIMSE access is by AE title'),
    ({'ca_bundle': '/etc/ca.pem'}, 'DICOM TLS is not supported'),
], ids=['protocol', 'http_url', 'no_port', 'bad_port', 'path', 'no_called_ae', 'long_ae',
        'backslash_ae', 'blank_ae', 'credentials', 'tls'])
def test_bad_dimse_settings_are_one_config_error(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    _dimse_settings(tmp_path, **overrides)


def test_dimse_settings_need_no_credentials(tmp_path):
  settings = _dimse_settings(tmp_path)
  assert settings.auth is pacs.Auth.NONE and settings.protocol == 'dimse'
  assert isinstance(pacs.make_client(settings, 1 << 20), pacs.DimseClient)
  assert isinstance(pacs.make_client(_settings(tmp_path), 1 << 20), pacs.DicomWebClient)
  # Through the run's config, as train.py reads it.
  config = config_lib.base_config()
  config.dataset = 'pacs'
  config.pacs.update({'protocol': 'dimse', 'url': 'dicom://pacs.hospital.example:104',
                      'called_ae': 'PACS', 'cache_dir': str(tmp_path / 'c')})
  config_lib.validate(config)
  config.pacs.called_ae = ''
  with pytest.raises(ConfigError, match='pacs.called_ae must be an AE title'):
    config_lib.validate(config)


def _status(code):
  status = pydicom.Dataset()
  status.Status = code
  return status


class FakeDimse:
  """A PACS behind fake pynetdicom associations: C-FIND (SERIES, IMAGE) and C-GET, whose
  instance comes to the C-STORE handler given at association, as pynetdicom does.

  `series` as FakeDicomWeb's; `connect_failures`: successive results of associating
  ('unreachable', ('rejected', result, diagnostic)); `get_failures`: {sop uid: number of C-GETs
  that get no answer}; `find_status`: the final status of every C-FIND; `get_status`: {sop uid:
  the final status of its C-GET, which sends nothing}.
  """

  def __init__(self, series, corrupt=(), connect_failures=(), get_failures=None,
               find_status=0x0000, get_status=None):
    self.series = series
    self.get_status = dict(get_status or {})
    self.corrupt = set(corrupt)
    self.connect_failures = list(connect_failures)
    self.get_failures = dict(get_failures or {})
    self.find_status = find_status
    self.associations = []
    self.queries = []
    self.retrieved = []

  def connect(self, handlers):
    association = FakeAssociation(self, dict(handlers))
    self.associations.append(association)
    failure = self.connect_failures.pop(0) if self.connect_failures else None
    if failure == 'unreachable':
      association.is_established, association.is_aborted = False, True
    elif failure:
      _, result, diagnostic = failure
      association.is_established, association.is_rejected = False, True
      association.acceptor.primitive = type('Rejection', (), {'result': result,
                                                              'diagnostic': diagnostic})()
    return association


class FakeAssociation:

  def __init__(self, pacs_server, handlers):
    self.pacs = pacs_server
    self.handlers = handlers
    self.is_established, self.is_rejected, self.is_aborted = True, False, False
    self.acceptor = type('Acceptor', (), {})()
    self.released = False

  def release(self):
    self.released, self.is_established = True, False

  def abort(self):
    self.is_aborted, self.is_established = True, False

  def send_c_find(self, query, model):
    from pynetdicom import sop_class  # pylint: disable=g-import-not-at-top
    assert self.is_established and model == sop_class.StudyRootQueryRetrieveInformationModelFind
    keys = {e.keyword: str(e.value) for e in query}
    self.pacs.queries.append(keys)
    for study, series, modality, body_part, description, sops in self.pacs.series:
      if keys['QueryRetrieveLevel'] == 'SERIES':
        if modality != keys['Modality'] or keys['StudyInstanceUID'] not in ('', study):
          continue
        match = pydicom.Dataset()
        match.StudyInstanceUID, match.SeriesInstanceUID = study, series
        match.Modality, match.BodyPartExamined = modality, body_part
        match.StudyDescription, match.SeriesDescription = description, ''
        match.PatientName = CANARY  # What a PACS may send unasked: must go no further.
        yield _status(0xFF00), match
      elif series == keys['SeriesInstanceUID']:
        for sop in sops:
          match = pydicom.Dataset()
          match.SOPInstanceUID = sop
          yield _status(0xFF00), match
    yield _status(self.pacs.find_status), None

  def send_c_get(self, query, model):
    from pynetdicom import evt  # pylint: disable=g-import-not-at-top
    from pynetdicom import sop_class  # pylint: disable=g-import-not-at-top
    assert self.is_established and model == sop_class.StudyRootQueryRetrieveInformationModelGet
    sop = query.SOPInstanceUID
    if self.pacs.get_failures.get(sop):
      self.pacs.get_failures[sop] -= 1
      self.abort()
      yield pydicom.Dataset(), None  # pynetdicom's "no response": timeout or abort.
      return
    modality = next((m for _, se, m, _, _, sops in self.pacs.series
                     if se == query.SeriesInstanceUID and sop in sops), None)
    if modality is None or sop in self.pacs.get_status:
      # Nothing matched (zero sub-operations), or the PACS could not send it.
      yield _status(self.pacs.get_status.get(sop, 0x0000)), None
      return
    data = _instance_bytes(modality, sop, rows=512 if sop in self.pacs.corrupt else None)
    event = type('Event', (), {'encoded_dataset': lambda self, include_meta=True: data})()
    self.pacs.retrieved.append(sop)
    store_status = self.handlers[evt.EVT_C_STORE](event)
    yield _status(0xFF00), None
    yield _status(0x0000 if store_status == 0 else 0xB000), None


def _load_dimse(tmp_path, fake, max_instance_bytes=1 << 20, **overrides):
  settings = _dimse_settings(tmp_path, **overrides)
  sleeps = []
  client = pacs.DimseClient(settings, connect=fake.connect, sleep=sleeps.append,
                            max_instance_bytes=max_instance_bytes)
  return pacs.load_pacs(settings, client=client), sleeps


def test_dimse_categorizes_asks_only_the_mappings_keys_and_caches(tmp_path, caplog):
  caplog.set_level(std_logging.DEBUG)
  fake = FakeDimse(_pacs(), corrupt={'1.9.1.1.2'})
  loaded, _ = _load_dimse(tmp_path, fake)
  assert loaded.category_counts() == {**{c: 0 for c in categories.CATEGORY_IDS},
                                      'HeadCT': 2, 'ChestCT': 2, 'Hand': 1}
  # The unmapped MR series is counted by listing its instances, never retrieved.
  assert loaded.report.reasons() == {dicom.REASON_NO_CATEGORY: 2, dicom.REASON_BAD_PIXELS: 1}
  assert sorted(fake.retrieved) == sorted(s for row in _pacs()[:3] for s in row[5])
  series_queries = [q for q in fake.queries if q['QueryRetrieveLevel'] == 'SERIES']
  assert {q['Modality'] for q in series_queries} == {'CT', 'MR', 'CR', 'DX'}
  assert all(set(q) == {'QueryRetrieveLevel', 'StudyInstanceUID', 'SeriesInstanceUID',
                        'Modality', 'BodyPartExamined', 'StudyDescription',
                        'SeriesDescription', 'NumberOfSeriesRelatedInstances'}
             for q in series_queries)
  assert all(set(q) == {'QueryRetrieveLevel', 'StudyInstanceUID', 'SeriesInstanceUID',
                        'SOPInstanceUID'} for q in fake.queries if q not in series_queries)
  # One association for the whole load, released at the end.
  assert len(fake.associations) == 1 and fake.associations[0].released
  # The same pixels as the folder loader's, the same pseudonyms and cache as over DICOMweb:
  # a second load (either protocol) retrieves nothing.
  expected = dicom.read_dicom_image(io.BytesIO(_instance_bytes('CT', '1.9.1.1.0')))
  assert any(np.array_equal(image, expected) for image in loaded.images)
  again_fake = FakeDimse(_pacs(), corrupt={'1.9.1.1.2'})
  again, _ = _load_dimse(tmp_path, again_fake)
  assert again_fake.retrieved == [] and '0 retrieved, 6 from cache' in again.report.summary()
  web = FakeDicomWeb(_pacs(), corrupt={'1.9.1.1.2'})
  from_web, _ = _load(tmp_path, web)
  assert web.retrieved == []
  np.testing.assert_array_equal(from_web.images, loaded.images)
  text = caplog.text + loaded.report.summary() + repr(loaded.report.skipped)
  for directory, _, files in os.walk(tmp_path / 'cache'):
    for f in files:
      with open(os.path.join(directory, f), 'rb') as handle:
        text += f + handle.read().decode('latin-1')
  assert CANARY not in text and '1.9.1.1' not in text


def test_dimse_failed_get_is_retried_on_a_new_association_then_skipped(tmp_path):
  fake = FakeDimse(_pacs(), get_failures={'1.9.1.1.0': 2, '1.9.1.1.1': 4})
  loaded, sleeps = _load_dimse(tmp_path, fake, backoff_seconds=0.5, max_attempts=4)
  assert '1.9.1.1.0' in fake.retrieved and '1.9.1.1.1' not in fake.retrieved
  assert loaded.report.reasons() == {pacs.REASON_RETRIEVE_FAILED: 1,
                                     dicom.REASON_NO_CATEGORY: 2}
  assert sorted(sleeps) == sorted([0.5, 1.0, 0.5, 1.0, 2.0])
  assert len(fake.associations) == 1 + 2 + 4  # Each failed try aborts its association.
  retry = FakeDimse(_pacs())
  again, _ = _load_dimse(tmp_path, retry)
  assert retry.retrieved == ['1.9.1.1.1'] and len(again) == 6


def test_dimse_get_that_sends_nothing_is_reported_and_retried_next_run(tmp_path):
  fake = FakeDimse(_pacs(), get_status={'1.9.1.1.0': 0x0000, '1.9.1.1.1': 0xB000,
                                        '1.9.2.1.1': 0xA702})
  loaded, sleeps = _load_dimse(tmp_path, fake)
  assert loaded.report.reasons() == {pacs.REASON_NOT_FOUND: 1, pacs.REASON_RETRIEVE_FAILED: 2,
                                     dicom.REASON_NO_CATEGORY: 2}
  assert len(loaded) == 3 and sleeps == []  # A PACS's answer is not retried.
  retry = FakeDimse(_pacs())
  _load_dimse(tmp_path, retry)
  assert sorted(retry.retrieved) == ['1.9.1.1.0', '1.9.1.1.1', '1.9.2.1.1']


def test_dimse_instance_over_the_limit_is_skipped_never_decoded(tmp_path):
  from tff_medical.data import limits as limits_lib  # pylint: disable=g-import-not-at-top
  fake = FakeDimse(_pacs())
  with pytest.raises(DataError, match='gave no usable image') as raised:
    _load_dimse(tmp_path, fake, max_instance_bytes=1000)
  assert f'6 {limits_lib.REASON_FILE_TOO_LARGE}' in str(raised.value)


@pytest.mark.parametrize('fake, message, error', [
    (FakeDimse(_pacs(), connect_failures=[('rejected', 1, 3)]),
     r"rejected the association: it does not allow calling AE title 'TFF-SITE' "
     r'\(pacs.calling_ae\)', ConfigError),
    (FakeDimse(_pacs(), connect_failures=[('rejected', 1, 7)]),
     r"rejected the association: its AE title is not 'PACS': check pacs.called_ae", ConfigError),
    (FakeDimse(_pacs(), connect_failures=[('rejected', 1, 1)]),
     r"rejected the association: check pacs.called_ae, and that it allows calling AE title",
     ConfigError),
    (FakeDimse(_pacs(), connect_failures=['unreachable'] * 4),
     r'dicom://127.0.0.1:11112 is unreachable \(no connection after 4 attempts\): check '
     r'pacs.url', DataError),
    (FakeDimse(_pacs(), connect_failures=[('rejected', 2, 1)] * 4),
     r'is unreachable \(association rejected for now \(busy\) after 4 attempts\)', DataError),
    (FakeDimse(_pacs(), find_status=0xA700),
     r'refused the query \(C-FIND status 0xA700\): does the PACS allow C-FIND and C-GET for '
     r'pacs.calling_ae\?', DataError),
    (FakeDimse([]), r'the query \(modalities CR, CT, DX, MR\) matched no series', DataError),
], ids=['unknown_calling_ae', 'wrong_called_ae', 'rejected', 'unreachable', 'busy',
        'find_refused', 'empty_query'])
def test_each_dimse_failure_is_one_clear_message(tmp_path, fake, message, error):
  _assert_one_clear_message(lambda: _load_dimse(tmp_path, fake), error, message)


def test_dimse_busy_pacs_is_retried(tmp_path):
  fake = FakeDimse(_pacs(), connect_failures=[('rejected', 2, 1), 'unreachable'])
  loaded, sleeps = _load_dimse(tmp_path, fake, backoff_seconds=1.0)
  assert len(loaded) == 6 and sleeps == [1.0, 2.0]


def test_dimse_unreachable_real_port_is_one_message(tmp_path):
  import portpicker  # pylint: disable=g-import-not-at-top
  settings = _dimse_settings(tmp_path, url=f'dicom://127.0.0.1:{portpicker.pick_unused_port()}',
                             max_attempts=2, backoff_seconds=0.01, timeout_seconds=5)
  with pytest.raises(DataError, match=r'is unreachable \(no connection after 2 attempts\)'):
    pacs.load_pacs(settings)


# --- End to end: a real Orthanc ----------------------------------------------------------------


@pytest.fixture(scope='module')
def orthanc(tmp_path_factory):
  """Orthanc on loopback (DICOMweb and DIMSE), seeded (3 copies of each SEEDS entry), one
  instance made corrupt."""
  import orthanc_fixture  # pylint: disable=g-import-not-at-top
  reason = orthanc_fixture.install_orthanc()
  if reason:
    pytest.skip(reason)
  server = orthanc_fixture.OrthancServer(str(tmp_path_factory.mktemp('orthanc')), dimse=True)
  server.start()
  try:
    seeded = orthanc_fixture.seed_instances(copies=3)
    ids = [server.upload(f) for f in seeded.files]
    # One Abdomen CT instance corrupt: reported and skipped, the rest goes on.
    corrupt = next(i for i, s in enumerate(seeded.specs) if s.expected == 'AbdomenCT')
    server.damage(ids[corrupt])
    credentials = tmp_path_factory.mktemp('site') / 'pacs_credentials'
    _private_file(credentials, f'{orthanc_fixture.USER}:{server.password}\n')
    yield server, seeded, corrupt, str(credentials)
  finally:
    server.cleanup()
  assert server.process is None


def _expected_counts(seeded, corrupt, modalities=('CT', 'MR', 'CR', 'DX')):
  counts = {c: 0 for c in categories.CATEGORY_IDS}
  unknown = 0
  for i, spec in enumerate(seeded.specs):
    if spec.modality not in modalities:
      continue
    if not spec.expected:
      unknown += 1
    elif i != corrupt:
      counts[spec.expected] += 1
  return counts, unknown


def _canaries_in(paths, canaries):
  """(file, canary) for every canary found in any file under `paths` (texts included)."""
  found = []
  for root in paths:
    if isinstance(root, str) and not os.path.exists(root):
      continue
    walk = os.walk(root) if os.path.isdir(root) else [(os.path.dirname(root), [],
                                                       [os.path.basename(root)])]
    for directory, _, files in walk:
      for name in files:
        path = os.path.join(directory, name)
        with open(path, 'rb') as f:
          data = f.read()
        found += [(path, c) for c in canaries if c.encode() in data or c in path]
  return found


@pytest.mark.slow  # End-to-end tier: a real Orthanc server.
def test_orthanc_ingest_categorizes_caches_and_reports(orthanc, tmp_path):
  server, seeded, corrupt, credentials = orthanc
  settings = pacs.PacsSettings(url=server.dicomweb_url, cache_dir=str(tmp_path / 'cache'),
                               credentials_file=credentials, backoff_seconds=0.1)
  before = server.wado_retrievals()
  loaded = pacs.load_pacs(settings)
  counts, unknown = _expected_counts(seeded, corrupt)
  assert loaded.category_counts() == counts
  assert loaded.report.reasons() == {dicom.REASON_NO_CATEGORY: unknown,
                                     dicom.REASON_BAD_PIXELS: 1}
  retrieved = server.wado_retrievals() - before
  assert retrieved == sum(counts.values()) + 1  # Unmapped series are never retrieved.
  assert not _canaries_in([str(tmp_path / 'cache')], seeded.canaries)
  # The check finds what it looks for: a seeded DICOM file would be caught.
  (tmp_path / 'control').write_bytes(seeded.files[0])
  assert _canaries_in([str(tmp_path / 'control')], seeded.canaries)
  for directory, _, files in os.walk(tmp_path / 'cache'):
    assert _mode(directory) == 0o700
    assert all(_mode(os.path.join(directory, f)) == 0o600 for f in files)
  # Second run: from the cache, no instance retrieved again (Orthanc's own request log).
  again = pacs.load_pacs(settings)
  assert server.wado_retrievals() - before == retrieved
  np.testing.assert_array_equal(again.images, loaded.images)
  # Asking for US too: its series are counted as unknown, still not retrieved.
  with_us = pacs.load_pacs(pacs.PacsSettings(
      url=server.dicomweb_url, cache_dir=str(tmp_path / 'cache'), credentials_file=credentials,
      modalities='CT,MR,CR,DX,US'))
  assert with_us.report.reasons()[dicom.REASON_NO_CATEGORY] == _expected_counts(
      seeded, corrupt, ('CT', 'MR', 'CR', 'DX', 'US'))[1] > unknown
  assert server.wado_retrievals() - before == retrieved


@pytest.mark.slow  # End-to-end tier: a real Orthanc server.
def test_orthanc_wrong_credentials_and_empty_query_are_one_message(orthanc, tmp_path):
  server, _, _, credentials = orthanc
  wrong = _private_file(tmp_path / 'wrong', 'tff-site:not-the-password\n')
  with pytest.raises(ConfigError, match=r'refused the credentials \(HTTP 401\)'):
    pacs.load_pacs(pacs.PacsSettings(url=server.dicomweb_url, cache_dir=str(tmp_path / 'c'),
                                     credentials_file=wrong))
  with pytest.raises(DataError, match=r'study_date 19000101-19000102\) matched no series'):
    pacs.load_pacs(pacs.PacsSettings(url=server.dicomweb_url, cache_dir=str(tmp_path / 'c'),
                                     credentials_file=credentials,
                                     study_date='19000101-19000102'))


@pytest.mark.slow  # End-to-end tier: a real Orthanc server, over TLS.
def test_tls_is_verified_against_the_ca_bundle(orthanc, tmp_path):
  import orthanc_fixture  # pylint: disable=g-import-not-at-top
  _, seeded, _, _ = orthanc  # Installed and seeded once; this server is a second one, on TLS.
  with orthanc_fixture.OrthancServer(str(tmp_path / 'tls_orthanc'), tls=True) as server:
    assert server.url.startswith('https://')
    head = next(i for i, s in enumerate(seeded.specs) if s.expected == 'HeadCT')
    server.upload(seeded.files[head])
    credentials = _private_file(tmp_path / 'credentials',
                                f'{orthanc_fixture.USER}:{server.password}\n')
    settings = dict(url=server.dicomweb_url, credentials_file=credentials, max_attempts=1)
    with pytest.raises(ConfigError, match='TLS certificate of the PACS .* is not trusted'):
      pacs.load_pacs(pacs.PacsSettings(cache_dir=str(tmp_path / 'c1'), **settings))
    loaded = pacs.load_pacs(pacs.PacsSettings(cache_dir=str(tmp_path / 'c2'),
                                              ca_bundle=server.ca_path, **settings))
    assert loaded.category_counts()['HeadCT'] == 1 and len(loaded) == 1


def _dimse(server, cache, **overrides):
  import orthanc_fixture  # pylint: disable=g-import-not-at-top
  values = dict(url=server.dicom_url, cache_dir=str(cache), protocol='dimse',
                called_ae=orthanc_fixture.CALLED_AE, calling_ae=server.calling_ae,
                backoff_seconds=0.1)
  values.update(overrides)
  return pacs.PacsSettings(**values)


@pytest.mark.slow  # End-to-end tier: a real Orthanc server, over DIMSE.
def test_orthanc_dimse_ingest_categorizes_caches_and_leaks_nothing(orthanc, tmp_path, caplog):
  server, seeded, corrupt, _ = orthanc
  for name in ('pynetdicom', 'pydicom'):  # What a load must silence, at its most verbose.
    std_logging.getLogger(name).setLevel(std_logging.DEBUG)
  caplog.set_level(std_logging.DEBUG)
  cache = tmp_path / 'cache'
  before = server.dimse_retrievals()
  loaded = pacs.load_pacs(_dimse(server, cache))
  counts, unknown = _expected_counts(seeded, corrupt)
  assert loaded.category_counts() == counts
  assert loaded.report.reasons() == {dicom.REASON_NO_CATEGORY: unknown,
                                     dicom.REASON_BAD_PIXELS: 1}
  retrieved = server.dimse_retrievals() - before
  assert retrieved == sum(counts.values()) + 1  # One C-GET a mapped instance, no more.
  # The same images and labels as over DICOMweb (same decode); another cache has another key,
  # so another pseudonymous order.
  web = pacs.load_pacs(pacs.PacsSettings(url=server.dicomweb_url, cache_dir=str(
      tmp_path / 'web_cache'), credentials_file=orthanc[3]))

  def contents(images):
    return sorted((int(label), image.tobytes()) for image, label in zip(images.images,
                                                                       images.labels))
  assert contents(web) == contents(loaded)
  # Second load: from the cache, not one C-GET (Orthanc's own log).
  again = pacs.load_pacs(_dimse(server, cache))
  assert server.dimse_retrievals() - before == retrieved
  assert '0 retrieved' in again.report.summary()
  np.testing.assert_array_equal(again.images, loaded.images)
  # The query filter reaches C-FIND: a date range with no study matches nothing.
  with pytest.raises(DataError, match=r'study_date 19000101-19000102\) matched no series'):
    pacs.load_pacs(_dimse(server, cache, study_date='19000101-19000102'))
  # The site through its flags: from the same cache, retrieving nothing, leaking nothing.
  from tff_medical.crosssilo import provisioning  # pylint: disable=g-import-not-at-top
  provisioning.provision(str(tmp_path / 'pki'), ['site-a'])
  site_dir = tmp_path / 'pki' / 'sites' / 'site-a'
  import orthanc_fixture  # pylint: disable=g-import-not-at-top
  flags = [f'--site_dir={site_dir}', '--dataset=pacs', '--pacs_protocol=dimse',
           f'--pacs_url={server.dicom_url}', f'--pacs_cache_dir={cache}',
           f'--pacs_called_ae={orthanc_fixture.CALLED_AE}']
  site = _run(['experiments/site.py', '--coordinator=127.0.0.1:9', '--max_wait_seconds=3',
               f'--pacs_calling_ae={server.calling_ae}'] + flags, timeout=300)
  assert f'site: {sum(counts.values())} local images' in site.stdout, site.stderr[-3000:]
  assert site.returncode == 2 and 'Traceback' not in site.stderr, site.stderr[-3000:]
  assert server.dimse_retrievals() - before == retrieved
  # An AE title the PACS does not list, through the same flags: one line, no traceback.
  refused = _run(['experiments/site.py', '--pacs_calling_ae=NOT-LISTED'] + flags, timeout=300)
  assert refused.returncode == 1 and 'Traceback' not in refused.stderr, refused.stderr[-3000:]
  assert ("rejected the association: it does not allow calling AE title 'NOT-LISTED'"
          in refused.stderr)
  leaks = _canaries_in([str(cache), str(site_dir)], seeded.canaries)
  assert not leaks, leaks[:5]
  outputs = caplog.text + site.stdout + site.stderr + refused.stdout + refused.stderr
  assert not [c for c in seeded.canaries if c in outputs]
  assert 'C-GET' in server.log_text()  # The check reads a log that holds the requests.


@pytest.mark.slow  # End-to-end tier: a real Orthanc server, over DIMSE.
def test_orthanc_dimse_refusals_are_one_message(orthanc, tmp_path):
  import portpicker  # pylint: disable=g-import-not-at-top
  server, _, _, _ = orthanc
  cache = tmp_path / 'cache'
  with pytest.raises(ConfigError, match=r'it does not allow calling AE title \'SOMEONE-ELSE\''):
    pacs.load_pacs(_dimse(server, cache, calling_ae='SOMEONE-ELSE'))
  with pytest.raises(ConfigError, match=r"its AE title is not 'NOT-THE-PACS'"):
    pacs.load_pacs(_dimse(server, cache, called_ae='NOT-THE-PACS'))
  with pytest.raises(DataError, match=r'is unreachable \(no connection after 2 attempts\)'):
    pacs.load_pacs(_dimse(server, cache, max_attempts=2, timeout_seconds=5,
                          url=f'dicom://127.0.0.1:{portpicker.pick_unused_port()}'))


def _run(args, env=None, timeout=600):
  return subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
                                                  FLWR_TELEMETRY_ENABLED='0', **(env or {})))


@pytest.mark.slow  # End-to-end tier: Orthanc, train.py and site.py processes.
def test_train_and_site_read_the_pacs_and_leak_nothing(orthanc, tmp_path):
  server, seeded, corrupt, credentials = orthanc
  cache = tmp_path / 'site_cache'
  config_path = tmp_path / 'pacs_config.py'
  config_path.write_text(
      'from tff_medical.training import config as config_lib\n'
      'def get_config():\n'
      '  config = config_lib.base_config()\n'
      "  config.dataset = 'pacs'\n"
      f'  config.pacs.url = {server.dicomweb_url!r}\n'
      f'  config.pacs.cache_dir = {str(cache)!r}\n'
      f'  config.pacs.credentials_file = {credentials!r}\n'
      '  config.num_clients = 4\n'
      '  config.clients_per_round = 2\n'
      '  config.total_rounds = 2\n'
      '  config.eval_every = 1\n'
      '  config.test_fraction = 0.2\n'
      '  config.model.conv_filters = (4,)\n'
      '  config.dp = False\n'
      '  config.release_non_private = True\n'
      '  return config\n')
  before = server.wado_retrievals()
  runs = tmp_path / 'runs'
  trained = _run(['experiments/train.py', f'--config={config_path}',
                  f'--root_output_dir={runs}', '--experiment_name=pacs'])
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'Traceback' not in trained.stderr
  counts, _ = _expected_counts(seeded, corrupt)
  assert server.wado_retrievals() - before == sum(counts.values()) + 1
  run_config = (runs / 'pacs' / 'config.json').read_text()
  assert f'{sum(counts.values())} images loaded' in run_config
  # The site reads the same PACS through its flags: from the cache, retrieving nothing. With
  # no coordinator it gives up after --max_wait_seconds (exit 2).
  from tff_medical.crosssilo import provisioning  # pylint: disable=g-import-not-at-top
  provisioning.provision(str(tmp_path / 'pki'), ['site-a'])
  site_dir = tmp_path / 'pki' / 'sites' / 'site-a'
  site = _run(['experiments/site.py', f'--site_dir={site_dir}', '--coordinator=127.0.0.1:9',
               '--dataset=pacs', f'--pacs_url={server.dicomweb_url}',
               f'--pacs_cache_dir={cache}', f'--pacs_credentials_file={credentials}',
               '--max_wait_seconds=3'], timeout=300)
  assert f'site: {sum(counts.values())} local images' in site.stdout, site.stderr[-3000:]
  assert site.returncode == 2, site.stderr[-3000:]
  assert 'Traceback' not in site.stderr
  assert server.wado_retrievals() - before == sum(counts.values()) + 1
  leaks = _canaries_in([str(runs), str(cache), str(site_dir)], seeded.canaries)
  assert not leaks, leaks[:5]
  outputs = trained.stdout + trained.stderr + site.stdout + site.stderr
  assert not [c for c in seeded.canaries if c in outputs]
  # Wrong credentials through the site's flags: one line, no traceback.
  wrong = _private_file(tmp_path / 'wrong', 'tff-site:wrong\n')
  refused = _run(['experiments/site.py', f'--site_dir={site_dir}', '--dataset=pacs',
                  f'--pacs_url={server.dicomweb_url}', f'--pacs_cache_dir={cache}',
                  f'--pacs_credentials_file={wrong}'], timeout=300)
  assert refused.returncode == 1 and 'Traceback' not in refused.stderr
  assert 'refused the credentials (HTTP 401)' in refused.stderr


@pytest.mark.slow  # End-to-end tier: Orthanc, a coordinator and two site processes.
def test_a_pacs_site_takes_part_in_a_cross_silo_run(orthanc, tmp_path):
  """site-a trains on phantoms, site-b on the PACS (flags only); 2 rounds with both."""
  import csv  # pylint: disable=g-import-not-at-top
  import portpicker  # pylint: disable=g-import-not-at-top
  from tff_medical.crosssilo import provisioning  # pylint: disable=g-import-not-at-top
  server, seeded, corrupt, credentials = orthanc
  pki = tmp_path / 'pki'
  provisioning.provision(str(pki), ['site-a', 'site-b'])
  config_path = tmp_path / 'crosssilo_config.py'
  config_path.write_text(
      'import pathlib, sys\n'
      f'sys.path.insert(0, {os.path.join(REPO, "tests")!r})\n'
      'def get_config():\n'
      '  import test_crosssilo\n'
      f'  return test_crosssilo._config(pathlib.Path({str(tmp_path)!r}), rounds=2)\n')
  fleet, driver = portpicker.pick_unused_port(), portpicker.pick_unused_port()
  runs, cache = tmp_path / 'runs', tmp_path / 'site_b_cache'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', FLWR_TELEMETRY_ENABLED='0', PYTHONPATH=REPO)
  logs, processes = {}, {}

  def spawn(name, args):
    logs[name] = tmp_path / f'{name}.log'
    with open(logs[name], 'wb') as log:
      processes[name] = subprocess.Popen([sys.executable] + args, cwd=REPO, env=env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
  try:
    spawn('coordinator', [
        'experiments/coordinator.py', f'--config={config_path}', f'--pki_dir={pki}',
        '--num_sites=2', '--threshold=2', f'--fleet_port={fleet}', f'--driver_port={driver}',
        '--stage_timeout=30', '--train_timeout=240', '--join_timeout=240',
        '--eval_dataset=phantoms', '--eval_num_per_category=10',
        f'--root_output_dir={runs}', '--experiment_name=pacs'])
    address = f'--coordinator=127.0.0.1:{fleet}'
    spawn('site-a', ['experiments/site.py', f'--site_dir={pki / "sites" / "site-a"}', address,
                     '--dataset=phantoms', '--num_per_category=10', '--max_wait_seconds=60'])
    spawn('site-b', ['experiments/site.py', f'--site_dir={pki / "sites" / "site-b"}', address,
                     '--dataset=pacs', f'--pacs_url={server.dicomweb_url}',
                     f'--pacs_cache_dir={cache}', f'--pacs_credentials_file={credentials}',
                     '--max_wait_seconds=60'])
    returncodes = {name: p.wait(timeout=900) for name, p in processes.items()}
  finally:
    for p in processes.values():
      if p.poll() is None:
        os.killpg(p.pid, 9)
        p.wait(timeout=30)
  text = {name: path.read_text(errors='replace') for name, path in logs.items()}
  assert returncodes == {'coordinator': 0, 'site-a': 0, 'site-b': 0}, {
      n: t[-2000:] for n, t in text.items()}
  counts, _ = _expected_counts(seeded, corrupt)
  assert f'site: {sum(counts.values())} local images' in text['site-b']
  with open(runs / 'pacs' / 'metrics.csv') as f:
    assert [int(r['num_clients']) for r in csv.DictReader(f)] == [2, 2]
  leaks = _canaries_in([str(runs), str(cache), str(pki / 'sites' / 'site-b')] +
                       [str(p) for p in logs.values()], seeded.canaries)
  assert not leaks, leaks[:5]
