"""A real Orthanc PACS for tests: Debian's orthanc + orthanc-dicomweb, on loopback, then stopped.

`OrthancServer` writes its own JSON configuration into a private temporary folder (0700):
storage there, HTTP on a free port with RemoteAccessAllowed false (only loopback clients),
AuthenticationEnabled with one registered user (so another local user cannot read the images
without the password, which lives in that folder only), WebDAV and the Explorer off, the
DICOMweb plugin on. The DICOM (DIMSE) server is off unless `dimse=True`: then it listens on a free
port (Orthanc binds it on every interface) and accepts an association only when the called AE
title is its own (DicomCheckCalledAet), the calling AE title is the one modality it lists
(`calling_ae`, random for each server, so it is as secret as the password) and the peer is
127.0.0.1 (DicomCheckModalityHost); that modality may only C-FIND and C-GET, and no
DicomAlwaysAllow* lets an unlisted AE in. DIMSE has no other access control.
`install_orthanc()` installs the two Debian packages when they are missing (as root, as
tests/install_browser.sh does for Chromium) and returns the reason when it cannot, for the test
to skip with.

`seed_instances()` builds the uploaded studies from pydicom's bundled test files, rewritten with
the six categories' Modality/BodyPartExamined and planted canary identifiers.
"""

import base64
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pydicom
from pydicom import data as pydicom_data
from pydicom import uid as pydicom_uid

ORTHANC = '/usr/sbin/Orthanc'
# Where the Debian package orthanc-dicomweb puts the plugin (dpkg -L orthanc-dicomweb).
DICOMWEB_PLUGIN = '/usr/share/orthanc/plugins/libOrthancDicomWeb.so'
USER = 'tff-site'
CALLED_AE = 'TFF-TEST-PACS'


def install_orthanc() -> str:
  """'' when Orthanc and its DICOMweb plugin are there (installed now if needed); else why not."""
  if os.path.exists(ORTHANC) and os.path.exists(DICOMWEB_PLUGIN):
    return ''
  if os.geteuid() != 0:
    return 'orthanc and orthanc-dicomweb are not installed and installing needs root'
  env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
  try:
    subprocess.run(['apt-get', 'update', '-qq'], env=env, check=True, capture_output=True,
                   timeout=600)
    # policy-rc.d may refuse to start the packaged service; the test starts its own server.
    subprocess.run(['apt-get', 'install', '-y', '-qq', 'orthanc', 'orthanc-dicomweb'], env=env,
                   check=False, capture_output=True, timeout=900)
  except (OSError, subprocess.SubprocessError) as e:
    return f'cannot install orthanc and orthanc-dicomweb with apt-get: {e}'
  if not (os.path.exists(ORTHANC) and os.path.exists(DICOMWEB_PLUGIN)):
    return 'apt-get did not install orthanc and orthanc-dicomweb'
  return ''


def _free_port() -> int:
  import portpicker  # pylint: disable=g-import-not-at-top
  return portpicker.pick_unused_port()


class OrthancServer:
  """One Orthanc process; `start()`, `stop()`, or use as a context manager."""

  def __init__(self, root: str = '', tls: bool = False, dimse: bool = False):
    self._own_root = not root
    self.dimse = dimse
    # 16 characters an AE title allows (no backslash, no space): unguessable by another user.
    self.calling_ae = 'S' + ''.join(
        '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ'[b % 36] for b in os.urandom(15))
    self.dicom_port = 0
    # Debian's Orthanc 1.10.1 crashes (SIGSEGV) on its first TLS handshake with OpenSSL 3, so
    # TLS is served by a front on loopback (`TlsFront`), as hospitals often do with a proxy.
    self.tls = tls
    self._front = None
    self.root = root or tempfile.mkdtemp(prefix='orthanc-')
    os.makedirs(self.root, mode=0o700, exist_ok=True)
    os.chmod(self.root, 0o700)
    self.password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    self.port = 0
    self.process = None
    self.log_path = os.path.join(self.root, 'orthanc.log')

  @property
  def url(self) -> str:
    if self.tls:
      return f'https://127.0.0.1:{self._front.port}'
    return f'http://127.0.0.1:{self.port}'

  @property
  def ca_path(self) -> str:
    """With tls: the PEM of the test CA that signed the server's certificate."""
    return os.path.join(self.root, 'ca.pem')

  @property
  def dicomweb_url(self) -> str:
    return f'{self.url}/dicom-web'

  @property
  def dicom_url(self) -> str:
    """With dimse: the DICOM port, as pacs.url for pacs.protocol 'dimse'."""
    return f'dicom://127.0.0.1:{self.dicom_port}'

  def start(self, timeout: float = 60.0) -> 'OrthancServer':
    self.port = _free_port()
    self.dicom_port = _free_port()
    storage = os.path.join(self.root, 'storage')
    os.makedirs(storage, mode=0o700, exist_ok=True)
    config = {
        'Name': 'tff-medical-test',
        'StorageDirectory': storage,
        'IndexDirectory': storage,
        'StorageCompression': False,
        # No in-memory copy of stored files: a test that damages a stored file sees it served.
        'MaximumStorageCacheSize': 0,
        'HttpPort': self.port,
        'RemoteAccessAllowed': False,
        'AuthenticationEnabled': True,
        'RegisteredUsers': {USER: self.password},
        'DicomServerEnabled': self.dimse,
        'DicomPort': self.dicom_port,
        'DicomAet': CALLED_AE,
        'DicomCheckCalledAet': True,
        'DicomCheckModalityHost': True,
        'DicomAlwaysAllowEcho': False,
        'DicomAlwaysAllowStore': False,
        'DicomAlwaysAllowFind': False,
        'DicomAlwaysAllowFindWorklist': False,
        'DicomAlwaysAllowGet': False,
        'DicomAlwaysAllowMove': False,
        # The site: C-FIND and C-GET only. Its Port is where Orthanc would connect for a C-MOVE
        # or C-STORE SCU, which it is not allowed: nothing listens there.
        'DicomModalities': {'site': {
            'AET': self.calling_ae, 'Host': '127.0.0.1', 'Port': _free_port(),
            'AllowEcho': False, 'AllowFind': True, 'AllowFindWorklist': False,
            'AllowGet': True, 'AllowMove': False, 'AllowStore': False,
            'AllowStorageCommitment': False}},
        'WebDavEnabled': False,
        'OrthancExplorerEnabled': False,
        'HttpCompressionEnabled': False,
        'Plugins': [DICOMWEB_PLUGIN],
        'DicomWeb': {'Enable': True, 'Root': '/dicom-web/', 'EnableWado': False},
    }
    config_path = os.path.join(self.root, 'orthanc.json')
    # The password is in it: owner-only from creation.
    fd = os.open(config_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, 'w') as f:
      json.dump(config, f)
    log = open(self.log_path, 'ab')  # pylint: disable=consider-using-with
    # --verbose logs each HTTP request, which is how a test counts retrievals.
    self.process = subprocess.Popen([ORTHANC, '--verbose', config_path], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    if self.tls:
      self._front = TlsFront(self.port, self._write_certificates())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f'Orthanc exited with {self.process.returncode}: '
                           f'{self.log_text()[-2000:]}')
      try:
        self.request('GET', '/system')
        return self
      except (OSError, urllib.error.URLError):
        time.sleep(0.2)
    self.stop()
    raise RuntimeError(f'Orthanc not ready after {timeout}s: {self.log_text()[-2000:]}')

  def stop(self) -> None:
    if self._front is not None:
      self._front.close()
      self._front = None
    if self.process is not None and self.process.poll() is None:
      os.killpg(self.process.pid, signal.SIGTERM)
      try:
        self.process.wait(timeout=20)
      except subprocess.TimeoutExpired:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=20)
    self.process = None

  def cleanup(self) -> None:
    self.stop()
    if self._own_root:
      shutil.rmtree(self.root, ignore_errors=True)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.cleanup()

  def log_text(self) -> str:
    try:
      with open(self.log_path, errors='replace') as f:
        return f.read()
    except OSError:
      return ''

  def request(self, method: str, path: str, body: bytes = b'',
              content_type: str = 'application/dicom'):
    """An authenticated REST call to Orthanc's own API; returns the decoded JSON (or bytes)."""
    token = base64.b64encode(f'{USER}:{self.password}'.encode()).decode()
    request = urllib.request.Request(self.url + path, data=body or None, method=method,
                                     headers={'Authorization': f'Basic {token}',
                                              'Content-Type': content_type})
    context = None
    if self.tls:
      import ssl  # pylint: disable=g-import-not-at-top
      context = ssl.create_default_context(cafile=self.ca_path)
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
      data = response.read()
    try:
      return json.loads(data)
    except ValueError:
      return data

  def _write_certificates(self) -> str:
    """A test CA (ca.pem) and a server certificate for 127.0.0.1 signed by it; returns the path
    of the server's PEM (private key + certificate, owner-only)."""
    # pylint: disable=g-import-not-at-top
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    # pylint: enable=g-import-not-at-top
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, public_key, signing_key, ca):
      builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                 .public_key(public_key).serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(minutes=5))
                 .not_valid_after(now + datetime.timedelta(days=1))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
      if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]), critical=False)
      return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'tff-medical test CA')])
    ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, '127.0.0.1')]),
                         ca_name, key.public_key(), ca_key, False)
    with open(self.ca_path, 'wb') as f:
      f.write(ca.public_bytes(serialization.Encoding.PEM))
    path = os.path.join(self.root, 'server.pem')
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, 'wb') as f:
      f.write(key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()))
      f.write(server.public_bytes(serialization.Encoding.PEM))
    return path

  def upload(self, dataset_bytes: bytes) -> str:
    """Stores one DICOM file (REST /instances); returns Orthanc's instance id."""
    return self.request('POST', '/instances', dataset_bytes)['ID']

  def attachment_path(self, orthanc_id: str) -> str:
    """The stored file of an instance (storage is uncompressed, one file per attachment)."""
    uuid = self.request('GET', f'/instances/{orthanc_id}/attachments/dicom/info')['Uuid']
    return os.path.join(self.root, 'storage', uuid[:2], uuid[2:4], uuid)

  def damage(self, orthanc_id: str) -> None:
    """Makes a stored instance corrupt: its Rows (explicit VR little endian) now claims 512, so
    the pixel data is 4x too short for its header. Orthanc still indexes and serves it."""
    path = self.attachment_path(orthanc_id)
    with open(path, 'rb') as f:
      data = f.read()
    rows = b'\x28\x00\x10\x00US\x02\x00'
    at = data.index(rows) + len(rows)
    with open(path, 'r+b') as f:
      f.seek(at)
      f.write((512).to_bytes(2, 'little'))

  def wado_retrievals(self) -> int:
    """WADO-RS instance retrievals Orthanc has logged so far."""
    return sum(1 for line in self.log_text().splitlines()
               if 'GET /dicom-web/studies/' in line and '/instances/' in line
               and '/metadata' not in line)


  def dimse_retrievals(self) -> int:
    """C-GET requests Orthanc has logged so far (the loader sends one per instance)."""
    return self.log_text().count('C-GET-SCU request received')


class TlsFront:
  """TLS on 127.0.0.1 in front of a plain loopback port: each connection is decrypted and
  relayed both ways. Loopback only, and it stops with `close()`."""

  def __init__(self, target_port: int, pem_path: str):
    # pylint: disable=g-import-not-at-top
    import socket
    import ssl
    import threading
    # pylint: enable=g-import-not-at-top
    self._target = target_port
    self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._context.load_cert_chain(pem_path)
    self._listener = socket.create_server(('127.0.0.1', 0))
    self.port = self._listener.getsockname()[1]
    self._closed = False
    self._threading = threading
    threading.Thread(target=self._serve, daemon=True).start()

  def _serve(self):
    import socket  # pylint: disable=g-import-not-at-top
    import ssl  # pylint: disable=g-import-not-at-top
    while not self._closed:
      try:
        client, _ = self._listener.accept()
      except OSError:
        return
      try:
        client.settimeout(30)
        secure = self._context.wrap_socket(client, server_side=True)
      except (OSError, ssl.SSLError):
        client.close()  # A client that does not trust the certificate ends here.
        continue
      try:
        upstream = socket.create_connection(('127.0.0.1', self._target))
      except OSError:
        secure.close()  # Orthanc not listening yet (the readiness probe retries).
        continue
      for source_socket, sink in ((secure, upstream), (upstream, secure)):
        self._threading.Thread(target=self._pipe, args=(source_socket, sink),
                               daemon=True).start()

  @staticmethod
  def _pipe(source_socket, sink):
    try:
      while True:
        data = source_socket.recv(65536)
        if not data:
          break
        sink.sendall(data)
    except OSError:
      pass
    finally:
      for s in (source_socket, sink):
        try:
          s.close()
        except OSError:
          pass

  def close(self):
    self._closed = True
    self._listener.close()


# Seeded studies -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SeedSpec:
  """One uploaded instance: what its tags say, and the category the mapping must give it."""

  modality: str
  body_part: str
  expected: str  # a category id, or '' for an instance no rule maps
  template: str = 'CT_small.dcm'
  study_description: str = ''


# The six categories by Modality/BodyPartExamined (dicom_mapping.json), one by a description
# keyword, and two no rule maps.
SEEDS = (
    SeedSpec('CT', 'HEAD', 'HeadCT'),
    SeedSpec('CT', 'CHEST', 'ChestCT'),
    SeedSpec('CT', 'ABDOMEN', 'AbdomenCT'),
    SeedSpec('MR', 'BREAST', 'BreastMRI', template='MR_small.dcm'),
    SeedSpec('CR', 'CHEST', 'CXR'),
    SeedSpec('DX', 'HAND', 'Hand', template='MR_small.dcm'),
    SeedSpec('CT', '', 'HeadCT', study_description='CT BRAIN W/O CONTRAST'),
    SeedSpec('MR', 'KNEE', ''),
    SeedSpec('US', 'ABDOMEN', ''),
)


@dataclasses.dataclass
class Seeded:
  """The instances built by `seed_instances`: DICOM bytes, specs, and every canary planted."""

  files: list
  specs: list
  canaries: set


def _uid(prefix: str, token: str, n: int) -> str:
  # Digits only, as UIDs must be; unique per run so that a leak is this run's, not a constant.
  return f'{prefix}.{int(token, 16) % 10**12}.{n}'


def seed_instances(copies: int = 2, token: str = '') -> Seeded:
  """`copies` instances of each SEEDS entry, each series in its own study, with canaries.

  Canaries (distinct per study and per run): PatientName, PatientID, PatientBirthDate,
  InstitutionName, AccessionNumber, ReferringPhysicianName, Study/Series Instance UIDs; and the
  SOP Instance UID of each instance.
  """
  token = token or os.urandom(6).hex()
  files, specs, canaries = [], [], set()
  for s, spec in enumerate(SEEDS):
    study_uid = _uid(pydicom_uid.PYDICOM_ROOT_UID.rstrip('.'), token, 1000 + s)
    series_uid = study_uid + '.1'
    for c in range(copies):
      ds = pydicom.dcmread(pydicom_data.get_testdata_file(spec.template))
      # Patient and study attributes are the study's (Orthanc keys a series by PatientID too).
      n = s
      values = {
          'PatientName': f'CANARY{token}^NAME{n}',
          'PatientID': f'CANARYID{token}{n}',
          'InstitutionName': f'CANARY{token} HOSPITAL {n}',
          'AccessionNumber': f'ACC{token[:6]}{n}',
          'ReferringPhysicianName': f'CANARYDR{token}^{n}',
      }
      for keyword, value in values.items():
        setattr(ds, keyword, value)
        canaries.add(value)
      ds.PatientBirthDate = f'19{(int(token[:2], 16) % 90) + 10:02d}0{1 + n % 9}1{n % 10}'
      canaries.add(ds.PatientBirthDate)
      ds.Modality = spec.modality
      ds.BodyPartExamined = spec.body_part
      ds.StudyDescription = spec.study_description
      ds.SeriesDescription = ''
      ds.StudyInstanceUID = study_uid
      ds.SeriesInstanceUID = series_uid
      ds.SOPInstanceUID = f'{series_uid}.{c + 1}'
      ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
      ds.StudyDate = '20240102'
      canaries.update({study_uid, series_uid, ds.SOPInstanceUID})
      # Keep only the bits of each UID that are ours: the template's own UIDs also appear in
      # other files (e.g. FrameOfReferenceUID), which is not what this test plants.
      for keyword in ('FrameOfReferenceUID',):
        if keyword in ds:
          del ds[keyword]
      import io  # pylint: disable=g-import-not-at-top
      buffer = io.BytesIO()
      ds.save_as(buffer, enforce_file_format=True)
      files.append(buffer.getvalue())
      specs.append(spec)
  return Seeded(files=files, specs=specs, canaries=canaries)


# Memory measurement (docs/PACS.md) ---------------------------------------------------------------

_MEASURE = '''
import resource, sys, time
from tff_medical.data import dicom, pacs
url, cache, credentials, modality = sys.argv[1:]
settings = pacs.PacsSettings(url=url, cache_dir=cache, credentials_file=credentials,
                             modalities=modality)
# The measurement's own modality code, mapped to Head CT.
mapping = dicom.DicomMapping.from_dict({'rules': [
    {'category': 'HeadCT', 'modalities': [modality], 'body_parts': ['HEAD']}]})
started = time.monotonic()
loaded = pacs.load_pacs(settings, mapping)
print(len(loaded), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic() - started)
'''


def measure_memory(sizes=(500, 1500, 3000)) -> list[tuple[int, int, float, int, float]]:
  """Peak RSS of a fresh process ingesting n instances, for each n of `sizes`.

  Instances are CT_small.dcm (128x128, 16 bits, about 39 KiB), 100 to a series; each size is
  its own modality code, so that one Orthanc holds them all and a query selects n of them.
  Returns (n, peak KiB from an empty cache, seconds, peak KiB from the cache, seconds).
  """
  import io  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  results = []
  template = pydicom.dcmread(pydicom_data.get_testdata_file('CT_small.dcm'))
  with OrthancServer() as server:
    credentials = os.path.join(server.root, 'credentials')
    fd = os.open(credentials, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, 'w') as f:
      f.write(f'{USER}:{server.password}\n')
    for k, n in enumerate(sizes):
      modality = f'CT{k}'
      for i in range(n):
        ds = template.copy()
        ds.Modality = modality
        ds.BodyPartExamined = 'HEAD'
        ds.StudyInstanceUID = f'1.2.826.0.1.3680043.8.498.77.{k}.{i // 100}'
        ds.SeriesInstanceUID = ds.StudyInstanceUID + '.1'
        ds.SOPInstanceUID = f'{ds.SeriesInstanceUID}.{i}'
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        server.upload(buffer.getvalue())
      cache = os.path.join(server.root, f'cache{k}')
      row = [n]
      for _ in range(2):  # Empty cache, then the same query from the cache.
        out = subprocess.run([sys.executable, '-c', _MEASURE, server.dicomweb_url, cache,
                              credentials, modality], capture_output=True, text=True, check=True)
        count, peak, seconds = out.stdout.split()
        assert int(count) == n, (count, n)
        row += [int(peak), float(seconds)]
      results.append(tuple(row))
  return results


if __name__ == '__main__':
  print('instances  peak RSS (MiB), empty cache  seconds  peak RSS (MiB), from cache  seconds')
  for n, peak, seconds, cached_peak, cached_seconds in measure_memory():
    print(f'{n:9d}  {peak / 1024:28.1f}  {seconds:7.1f}  {cached_peak / 1024:26.1f}  '
          f'{cached_seconds:7.1f}')
