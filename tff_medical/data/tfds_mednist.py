"""MedNIST as a TensorFlow Datasets builder: 'tff_medical_mednist', built from a manual download.

  import tensorflow_datasets as tfds
  from tff_medical.data import tfds_mednist  # registers the builder

  builder = tfds.builder('tff_medical_mednist')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir='~/mednist'))
  train = builder.as_dataset(split='train', as_supervised=True)

Images are read with `mednist.load_mednist`, so the archive and the folder give the same data
and bad files are skipped the same way. The split is decided per file by a hash of its path
under the data root ('Hand/001234.jpeg'): the same file always lands in the same split, whatever
the order of files or the other files present.
"""

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from tff_medical import categories
from tff_medical.data import mednist

TEST_PERCENT = 10
ARCHIVE_NAME = 'MedNIST.tar.gz'


def is_test(key: str) -> bool:
  """Whether the file with this key belongs to the test split. sha256: stable across runs."""
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') % 100 < TEST_PERCENT


def _source_in(manual_dir: str) -> str:
  """The archive if present, else an extracted MedNIST folder, else the folder itself."""
  archive = os.path.join(manual_dir, ARCHIVE_NAME)
  if os.path.isfile(archive):
    return archive
  folder = os.path.join(manual_dir, 'MedNIST')
  if os.path.isdir(folder):
    return folder
  return manual_dir


class TffMedicalMednist(tfds.core.GeneratorBasedBuilder):
  """MedNIST: 64x64 grayscale medical images in six categories."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: train and test splits (90/10 by file path hash).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download MedNIST (MONAI's MedNIST.tar.gz, about 60 MB) and place in `manual_dir` either:
    * the archive itself, named {ARCHIVE_NAME}, or
    * its extracted folder MedNIST/ (one subfolder per category: {", ".join(
        sorted(categories.CATEGORY_IDS))}), or
    * the category subfolders directly.
  The archive is read without extracting it.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    size = categories.IMAGE_SIZE
    return self.dataset_info_from_configs(
        description=('MedNIST: 58,954 64x64 grayscale medical images in six categories (head CT, '
                     'breast MRI, abdomen CT, chest CT, chest X-ray, hand X-ray), label order '
                     'as tff_medical.categories.CATEGORY_IDS.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=list(categories.CATEGORY_IDS)),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/Project-MONAI/MONAI',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    data, keys = mednist.load_mednist_with_keys(_source_in(os.fspath(dl_manager.manual_dir)))
    test = np.array([is_test(k) for k in keys], dtype=bool)
    return {
        'train': self._generate_examples(data, keys, np.flatnonzero(~test)),
        'test': self._generate_examples(data, keys, np.flatnonzero(test)),
    }

  def _generate_examples(self, data, keys, indices):
    for i in indices:
      yield keys[i], {'image': data.images[i][..., np.newaxis], 'label': int(data.labels[i])}
