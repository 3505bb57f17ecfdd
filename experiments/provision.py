"""Creates the certificate authority, the coordinator's identity and each site's credentials.

  .venv/bin/python experiments/provision.py --pki_dir=pki --sites=site-a,site-b \
      [--hosts=127.0.0.1,localhost] [--valid_days=365]
  .venv/bin/python experiments/provision.py --pki_dir=pki --add_sites=site-c   # enroll later

Give pki/sites/<name>/ (and only that folder) to site <name>; the coordinator uses
pki/coordinator/. Keep pki/ca/ca.key offline: whoever holds it can mint site identities.
"""

import sys

from absl import app
from absl import flags

_PKI_DIR = flags.DEFINE_string('pki_dir', None, 'Folder for the CA, coordinator and sites.')
_SITES = flags.DEFINE_list('sites', [], 'Sites to enroll in a new PKI folder.')
_ADD_SITES = flags.DEFINE_list('add_sites', [], 'Sites to enroll in an existing PKI folder.')
_HOSTS = flags.DEFINE_list('hosts', ['127.0.0.1', 'localhost'],
                           "Names and IPs the sites use to reach the coordinator (its "
                           "certificate's SANs).")
_VALID_DAYS = flags.DEFINE_integer('valid_days', 365, 'Validity of issued certificates (days).')
flags.mark_flags_as_required(['pki_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # pylint: disable=g-import-not-at-top
  from tff_medical.crosssilo import provisioning
  from tff_medical.errors import TffMedicalError
  # pylint: enable=g-import-not-at-top
  if bool(_SITES.value) == bool(_ADD_SITES.value):
    raise app.UsageError('Give exactly one of --sites (new PKI) or --add_sites (existing PKI).')
  try:
    if _SITES.value:
      provisioning.create_authority(_PKI_DIR.value)
      folders = provisioning.provision(_PKI_DIR.value, _SITES.value, _HOSTS.value,
                                       _VALID_DAYS.value)
    else:
      folders = {s: provisioning.enroll_site(_PKI_DIR.value, s, _VALID_DAYS.value)
                 for s in _ADD_SITES.value}
  except TffMedicalError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  for party, folder in folders.items():
    print(f'{party:<16}{folder}')
  if _ADD_SITES.value:
    print('Restart the coordinator to load the new enrolled_sites.csv.')


if __name__ == '__main__':
  app.run(main)
