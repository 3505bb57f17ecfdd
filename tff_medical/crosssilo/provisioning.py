"""Provisioning: a certificate authority, the coordinator's and each site's keys and certificates.

The two checks they serve and the PKI folder's layout: docs/DESIGN.md.
"""

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID

from tff_medical import fileio
from tff_medical.errors import ConfigError

CA_DIR = 'ca'
COORDINATOR_DIR = 'coordinator'
SITES_DIR = 'sites'
CA_CERT = 'ca.pem'
CA_KEY = 'ca.key'
CERT = 'cert.pem'
KEY = 'key.pem'
AUTH_KEY = 'auth_key'
AUTH_PUBLIC_KEY = 'auth_key.pub'
ENROLLED_SITES = 'enrolled_sites.csv'
DEFAULT_HOSTS = ('127.0.0.1', 'localhost')
_SITE_NAME = re.compile(r'[a-z0-9][a-z0-9_-]{0,62}')


def _utcnow() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def _private_dir(folder: str) -> None:
  """Creates `folder` and its missing parents owner-only (0700) and makes `folder` 0700.

  os.makedirs gives missing parents the umask's mode (often 0755), so each level is made here.
  """
  folder = os.path.abspath(folder)
  missing = []
  while not os.path.isdir(folder):
    missing.append(folder)
    folder = os.path.dirname(folder)
  for path in reversed(missing):
    try:
      os.mkdir(path, 0o700)
    except FileExistsError:
      pass
  os.chmod(missing[0] if missing else folder, 0o700)


def _write(path: str, data: bytes, private: bool = False) -> None:
  """Atomic write into an owner-only folder; a private file is 0600 from creation (mkstemp's
  O_EXCL 0600 temporary file keeps that mode through the rename): no readable moment."""
  _private_dir(os.path.dirname(path))
  fileio.write_atomic(path, data, mode=0o600 if private else 0o644)


def _key_pem(key) -> bytes:
  return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
  return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'tff_medical'),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
  names = []
  for host in hosts:
    try:
      names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
      names.append(x509.DNSName(host))
  return x509.SubjectAlternativeName(names)


def create_authority(pki_dir: str, name: str = 'tff_medical cross-silo CA',
                     valid_days: int = 3650, overwrite: bool = False) -> str:
  """Creates pki_dir/ca (a self-signed EC CA); returns the CA certificate's path."""
  cert_path = os.path.join(pki_dir, CA_DIR, CA_CERT)
  if os.path.exists(cert_path) and not overwrite:
    raise ConfigError(f'pki_dir must not hold a CA yet. Found {cert_path}: enroll more sites '
                      'in it (experiments/provision.py --add_sites), or pick a new folder (a new '
                      'CA invalidates every certificate issued so far).')
  key = ec.generate_private_key(ec.SECP256R1())
  now = _utcnow()
  cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=valid_days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(key, hashes.SHA256()))
  _write(os.path.join(pki_dir, CA_DIR, CA_KEY), _key_pem(key), private=True)
  _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
  return cert_path


def _load_ca(pki_dir: str):
  try:
    with open(os.path.join(pki_dir, CA_DIR, CA_CERT), 'rb') as f:
      cert = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(pki_dir, CA_DIR, CA_KEY), 'rb') as f:
      key = serialization.load_pem_private_key(f.read(), None)
  except FileNotFoundError:
    raise ConfigError(f'pki_dir must hold a CA ({CA_DIR}/{CA_CERT}, {CA_DIR}/{CA_KEY}). Found none '
                      f'in {pki_dir}: run experiments/provision.py first.') from None
  return cert, key


def issue_certificate(pki_dir: str, out_dir: str, common_name: str,
                      hosts: Sequence[str] = (), server: bool = False,
                      valid_days: int = 365,
                      not_valid_before: Optional[datetime.datetime] = None,
                      not_valid_after: Optional[datetime.datetime] = None) -> str:
  """Writes out_dir/{ca.pem, cert.pem, key.pem}: an EC key and its certificate from the CA."""
  ca_cert, ca_key = _load_ca(pki_dir)
  key = ec.generate_private_key(ec.SECP256R1())
  now = _utcnow()
  start = not_valid_before or now - datetime.timedelta(minutes=5)
  end = not_valid_after or now + datetime.timedelta(days=valid_days)
  usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server
                                                else [])
  builder = (x509.CertificateBuilder().subject_name(_name(common_name))
             .issuer_name(ca_cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
  if hosts:
    builder = builder.add_extension(_san(hosts), critical=False)
  cert = builder.sign(ca_key, hashes.SHA256())
  _write(os.path.join(out_dir, KEY), _key_pem(key), private=True)
  _write(os.path.join(out_dir, CERT), cert.public_bytes(serialization.Encoding.PEM))
  _write(os.path.join(out_dir, CA_CERT), ca_cert.public_bytes(serialization.Encoding.PEM))
  return os.path.join(out_dir, CERT)


def write_auth_keys(out_dir: str) -> str:
  """Writes out_dir/auth_key (OpenSSH EC private key) and auth_key.pub; returns the public line."""
  key = ec.generate_private_key(ec.SECP384R1())
  private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                              serialization.NoEncryption())
  public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
  _write(os.path.join(out_dir, AUTH_KEY), private, private=True)
  _write(os.path.join(out_dir, AUTH_PUBLIC_KEY), public + b'\n')
  return public.decode()


def check_site_name(name: str) -> str:
  if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
    raise ConfigError('site name must be 1-63 lowercase letters, digits, "-" or "_", starting '
                      f'with a letter or digit. Found {name!r}.')
  return name


def site_name_of(folder: str) -> str:
  """The enrolled name of the site whose folder this is (its certificate's CN, site:NAME)."""
  path = os.path.join(folder, CERT)
  try:
    with open(path, 'rb') as f:
      cert = x509.load_pem_x509_certificate(f.read())
  except (OSError, ValueError) as e:
    raise ConfigError(f'site_dir must hold the site\'s certificate. Found none readable at '
                      f'{path} ({e}).') from None
  names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
  common = names[0].value if names else ''
  if not common.startswith('site:'):
    raise ConfigError(f'the certificate in {folder} must be a site\'s (CN site:NAME). '
                      f'Found CN {common!r}.')
  return check_site_name(common[len('site:'):])


def site_dir(pki_dir: str, name: str) -> str:
  return os.path.join(pki_dir, SITES_DIR, check_site_name(name))


def issue_coordinator(pki_dir: str, hosts: Sequence[str] = DEFAULT_HOSTS,
                      valid_days: int = 365) -> str:
  """The coordinator's TLS identity for `hosts` and the SuperLink's node-auth keys."""
  out = os.path.join(pki_dir, COORDINATOR_DIR)
  issue_certificate(pki_dir, out, 'coordinator', hosts=hosts, server=True,
                    valid_days=valid_days)
  write_auth_keys(out)
  enrolled = os.path.join(out, ENROLLED_SITES)
  if not os.path.exists(enrolled):
    _write(enrolled, b'')
  return out


def enroll_site(pki_dir: str, name: str, valid_days: int = 365, **validity) -> str:
  """Issues site `name` its certificate and node-auth keys and adds its key to the enrolled list.

  Returns the site's folder: hand it (and only it) to the site. Enrolling a name again replaces
  its keys; the old key is dropped from the list.
  """
  out = site_dir(pki_dir, name)
  issue_certificate(pki_dir, out, f'site:{name}', valid_days=valid_days, **validity)
  enrolled = os.path.join(pki_dir, COORDINATOR_DIR, ENROLLED_SITES)
  if not os.path.exists(enrolled):
    raise ConfigError(f'pki_dir must have the coordinator issued before sites. Found no '
                      f'{enrolled}.')
  public = write_auth_keys(out)
  with open(enrolled) as f:
    lines = [l.strip() for l in f if l.strip()]
  marker = f' site:{name}'
  lines = [l for l in lines if not l.endswith(marker)]
  lines.append(public + marker)
  _write(enrolled, ('\n'.join(lines) + '\n').encode())
  return out


def provision(pki_dir: str, sites: Sequence[str], hosts: Sequence[str] = DEFAULT_HOSTS,
              valid_days: int = 365) -> dict[str, str]:
  """CA (if missing), coordinator identity, and each site; returns {party: folder}."""
  names = [check_site_name(s) for s in sites]
  if len(set(names)) != len(names):
    raise ConfigError(f'site names must be distinct. Found {list(sites)}.')
  if not os.path.exists(os.path.join(pki_dir, CA_DIR, CA_CERT)):
    create_authority(pki_dir)
  out = {'coordinator': issue_coordinator(pki_dir, hosts, valid_days)}
  for name in names:
    out[name] = enroll_site(pki_dir, name, valid_days)
  return out


def load_private_key(path: str):
  with open(path, 'rb') as f:
    return serialization.load_ssh_private_key(f.read(), None)


def load_public_key(path: str):
  with open(path, 'rb') as f:
    return serialization.load_ssh_public_key(f.read().strip())
