"""Runs one site: trains on its own images and sends only masked, clipped updates.

  .venv/bin/python experiments/site.py --site_dir=pki/sites/site-a \
      --coordinator=127.0.0.1:9092 --dataset=mednist --data_dir=/data/site-a

--dataset: mednist (a folder with one subfolder per category, or MedNIST.tar.gz), dicom (a
folder of DICOM files), pacs (the hospital's PACS over DICOMweb: --pacs_url, --pacs_cache_dir
and credentials; or over DIMSE: --pacs_protocol=dimse --pacs_url=dicom://HOST:PORT and the AE
titles; see README "Reading from a PACS") or phantoms (synthetic, for trials). The
images never leave this process. The site exits when the coordinator has been unreachable for
--max_wait_seconds.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['FLWR_TELEMETRY_ENABLED'] = '0'

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow  # pylint: disable=unused-import,g-import-not-at-top

from tff_medical.data import sources  # pylint: disable=g-import-not-at-top

_SITE_DIR = flags.DEFINE_string('site_dir', None, "This site's folder from provisioning.")
_COORDINATOR = flags.DEFINE_string('coordinator', '127.0.0.1:9092',
                                   "The coordinator's Fleet API address (host:port).")
_DATASET = flags.DEFINE_enum('dataset', 'mednist', list(sources.NAMES),
                             'Kind of local data.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'Local data folder (mednist, dicom).')
_NUM_PER_CATEGORY = flags.DEFINE_integer('num_per_category', 20, 'phantoms only.')
# pacs only (tff_medical.data.pacs.PacsSettings documents each).
_PACS_URL = flags.DEFINE_string('pacs_url', '', 'pacs: the DICOMweb root URL, or '
                                'dicom://HOST:PORT with --pacs_protocol=dimse.')
_PACS_PROTOCOL = flags.DEFINE_enum('pacs_protocol', 'dicomweb', ['dicomweb', 'dimse'],
                                   'pacs: QIDO-RS/WADO-RS, or C-FIND/C-GET.')
_PACS_CALLED_AE = flags.DEFINE_string('pacs_called_ae', '', "pacs, dimse: the PACS's AE title.")
_PACS_CALLING_AE = flags.DEFINE_string('pacs_calling_ae', 'TFF-SITE',
                                       "pacs, dimse: this site's AE title, as the PACS lists it.")
_PACS_CACHE_DIR = flags.DEFINE_string('pacs_cache_dir', '',
                                      "pacs: this site's owner-only cache of decoded images.")
_PACS_AUTH = flags.DEFINE_enum('pacs_auth', 'basic', ['basic', 'bearer', 'none'],
                               'pacs: HTTP basic (user:password) or bearer token.')
_PACS_CREDENTIALS_FILE = flags.DEFINE_string(
    'pacs_credentials_file', '', 'pacs: owner-only file holding user:password or the token.')
_PACS_CREDENTIALS_ENV = flags.DEFINE_string(
    'pacs_credentials_env', '', 'pacs: or the name of an environment variable holding it.')
_PACS_CA_BUNDLE = flags.DEFINE_string('pacs_ca_bundle', '', "pacs: the PACS's CA bundle (PEM).")
_PACS_MODALITIES = flags.DEFINE_list('pacs_modalities', [],
                                     'pacs: modalities to query (default: the mapping\'s).')
_PACS_STUDY_DATE = flags.DEFINE_string('pacs_study_date', '',
                                       'pacs: StudyDate range, e.g. 20200101-20231231.')
_PACS_STUDY_LIST = flags.DEFINE_string('pacs_study_list', '',
                                       'pacs: file of Study Instance UIDs, one a line.')
_SEED = flags.DEFINE_integer('seed', 0, 'phantoms: data seed; also the local shuffling seed.')
_MAX_WAIT = flags.DEFINE_float('max_wait_seconds', 300.0,
                               'Give up after the coordinator is unreachable this long.')
_STATE_DIR = flags.DEFINE_string(
    'state_dir', '', "Folder of this site's own example-level ledgers, one per run (default: "
    '<site_dir>/state). Keep it: a site without its ledger is left out of the run.')
_FAULT = flags.DEFINE_enum('fault', 'none', ['none', 'crash', 'nan', 'huge'],
                           'Testing only: misbehave (see tff_medical.crosssilo.site_runtime).')
_FAULT_ROUND = flags.DEFINE_integer('fault_round', 0, 'Testing only: round of --fault=crash.')
flags.mark_flags_as_required(['site_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # pylint: disable=g-import-not-at-top
  from tff_medical.crosssilo import site_runtime
  from tff_medical.errors import TffMedicalError
  # pylint: enable=g-import-not-at-top
  source = sources.get(_DATASET.value)
  if source.needs_data_dir and not _DATA_DIR.value:
    raise app.UsageError(f'--data_dir is required for --dataset={_DATASET.value}.')
  try:
    images = source.load(data_dir=_DATA_DIR.value, num_per_category=_NUM_PER_CATEGORY.value,
                         seed=_SEED.value, pacs=_pacs_settings() if source.remote else None)
    print(f'site: {len(images)} local images; connecting to {_COORDINATOR.value}', flush=True)
    result = site_runtime.run_site(
        _SITE_DIR.value, _COORDINATOR.value, images, site_seed=_SEED.value,
        max_wait_seconds=_MAX_WAIT.value, fault=site_runtime.Fault(_FAULT.value),
        fault_round=_FAULT_ROUND.value, state_dir=_STATE_DIR.value)
  except TffMedicalError as e:
    print(f'error: {e}', file=sys.stderr)
    _exit(1)
  if not result.joined:
    print(f'error: could not take part in any round at {_COORDINATOR.value}: the coordinator '
          'is unreachable, or refused this site (certificate not signed by its CA, expired, or '
          'key not enrolled).', file=sys.stderr)
    _exit(2)
  print(f'site: done after {result.rounds} rounds.', flush=True)
  _exit(0)


def _pacs_settings() -> dict:
  return {'url': _PACS_URL.value, 'cache_dir': _PACS_CACHE_DIR.value,
          'protocol': _PACS_PROTOCOL.value, 'called_ae': _PACS_CALLED_AE.value,
          'calling_ae': _PACS_CALLING_AE.value, 'auth': _PACS_AUTH.value,
          'credentials_file': _PACS_CREDENTIALS_FILE.value,
          'credentials_env': _PACS_CREDENTIALS_ENV.value, 'ca_bundle': _PACS_CA_BUNDLE.value,
          'modalities': tuple(_PACS_MODALITIES.value), 'study_date': _PACS_STUDY_DATE.value,
          'study_list_file': _PACS_STUDY_LIST.value}


def _exit(code: int) -> None:
  # A gRPC channel that Flower leaves open can deadlock in its finalizer at interpreter
  # shutdown (grpc 1.74), so the site would never exit: nothing is left to clean up here.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main)
