"""The registry of image sources: each name, what it needs, and its loader; adding one is here.

Config validation, the simulation, the cross-silo coordinator and site, and the model card all
read this table. Loaders import their module when called, so reading the table stays cheap.
"""

import dataclasses
from typing import Callable, Optional

from tff_medical.data import source as source_lib
from tff_medical.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataSource:
  """One image source.

  Attributes:
    name: the config value (`config.dataset`, `--dataset`, `eval_dataset`).
    display_name: how a model card names the images.
    generated: True when the images are made here from a seed and `num_per_category` (no
      data_dir, nobody's images, so no budget registry); False when read from `data_dir`.
    remote: True when the images are pulled from a server named by the `pacs` settings (real
      images, but no data_dir).
  """

  name: str
  display_name: str
  generated: bool
  _load: Callable[..., source_lib.LabeledImages] = dataclasses.field(repr=False)
  remote: bool = False

  @property
  def needs_data_dir(self) -> bool:
    return not self.generated and not self.remote

  def load(self, *, data_dir: str = '', num_per_category: Optional[int] = None, seed: int = 0,
           difficulty: Optional[float] = None, held_out: bool = False, pacs=None
           ) -> source_lib.LabeledImages:
    """Loads the whole source.

    Args:
      data_dir: the folder or archive of a source that needs one; ignored otherwise.
      num_per_category, seed, difficulty: a generated source's size, seed and difficulty
        (None: its default); ignored by sources read from disk.
      held_out: a generated source draws from a stream disjoint from the training one (an
        evaluation set); ignored by sources read from disk.
      pacs: a remote source's settings (`config.pacs`, see data/pacs.py); ignored otherwise.

    Returns:
      uint8 images (N, 64, 64), their labels and the load report.
    """
    return self._load(data_dir=data_dir, num_per_category=num_per_category, seed=seed,
                      difficulty=difficulty, held_out=held_out, pacs=pacs)


# pylint: disable=g-import-not-at-top
def _load_phantoms(*, num_per_category, seed, difficulty, held_out, **_):
  from tff_medical.data import phantoms
  return phantoms.generate(
      num_per_category, seed=seed,
      difficulty=phantoms.DEFAULT_DIFFICULTY if difficulty is None else difficulty,
      stream=phantoms.TEST_STREAM if held_out else phantoms.TRAIN_STREAM)


def _load_mednist(*, data_dir, **_):
  from tff_medical.data import mednist
  return mednist.load_mednist(data_dir)


def _load_dicom(*, data_dir, **_):
  from tff_medical.data import dicom
  return dicom.load_dicom_folder(data_dir)


def _load_pacs(*, pacs, **_):
  from tff_medical.data import pacs as pacs_lib
  return pacs_lib.load_pacs(pacs)
# pylint: enable=g-import-not-at-top


SOURCES: dict[str, DataSource] = {s.name: s for s in (
    DataSource('phantoms', 'phantoms', generated=True, _load=_load_phantoms),
    DataSource('mednist', 'MedNIST', generated=False, _load=_load_mednist),
    DataSource('dicom', 'DICOM', generated=False, _load=_load_dicom),
    DataSource('pacs', 'PACS', generated=False, _load=_load_pacs, remote=True),
)}
NAMES = tuple(SOURCES)


def get(name: str) -> DataSource:
  """The source called `name`; ConfigError naming the known ones otherwise."""
  if not isinstance(name, str) or name not in SOURCES:
    raise ConfigError(f'dataset must be one of {", ".join(NAMES)}. Found {name!r}.')
  return SOURCES[name]


def load(name: str, **kwargs) -> source_lib.LabeledImages:
  """get(name).load(**kwargs)."""
  return get(name).load(**kwargs)
