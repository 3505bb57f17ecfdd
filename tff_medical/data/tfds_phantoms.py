"""The phantoms as a TensorFlow Datasets builder: `tff_medical_phantoms`, nothing downloaded.

  import tff_medical.data.tfds_phantoms  # Registers the builder.
  train = tfds.load('tff_medical_phantoms/tiny', split='train', data_dir=...,
                    download_and_prepare_kwargs={'download_config': NO_GCS})

Examples are generated from fixed seeds, so every build of a config holds the same bytes. A
custom size is a PhantomsConfig passed as `config=` to TffMedicalPhantoms.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from tff_medical import categories
from tff_medical.data import phantoms

# Nothing of this builder is on the public TFDS bucket; asking it costs a network timeout.
NO_GCS = tfds.download.DownloadConfig(try_download_gcs=False)


@dataclasses.dataclass(eq=False)
class PhantomsConfig(tfds.core.BuilderConfig):
  """Size and generation settings of one build."""

  train_per_category: int = 2000
  test_per_category: int = 500
  difficulty: float = phantoms.DEFAULT_DIFFICULTY
  seed: int = 0


class TffMedicalPhantoms(tfds.core.GeneratorBasedBuilder):
  """Six-category 64x64 grayscale phantoms (see tff_medical.data.phantoms)."""

  name = 'tff_medical_phantoms'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      PhantomsConfig(name='default', description='2000 training and 500 test images per '
                     'category.'),
      PhantomsConfig(name='tiny', description='For tests: 8 training, 4 test per category.',
                     train_per_category=8, test_per_category=4),
  ]
  DEFAULT_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=('Synthetic phantoms of six medical imaging categories (the MedNIST '
                     'classes), generated deterministically; no download.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(categories.IMAGE_SIZE, categories.IMAGE_SIZE, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=list(categories.CATEGORY_IDS)),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
        'train': self._generate_examples(config.train_per_category, phantoms.TRAIN_STREAM),
        'test': self._generate_examples(config.test_per_category, phantoms.TEST_STREAM),
    }

  def _generate_examples(self, num_per_category: int, stream: int):
    config = self.builder_config
    data = phantoms.generate(num_per_category, config.seed, difficulty=config.difficulty,
                             stream=stream)
    for index, (image, label) in enumerate(zip(data.images, data.labels)):
      yield index, {'image': image[:, :, np.newaxis], 'label': int(label)}
