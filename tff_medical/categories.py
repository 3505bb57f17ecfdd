"""The six image categories: the classes of the public MedNIST data set.

The category ids, their order (which is the label index) and display names are fixed by the
product; what each category's privacy budget is belongs to the policy (configs/), not here.
"""

CATEGORY_IDS = ('HeadCT', 'BreastMRI', 'AbdomenCT', 'ChestCT', 'CXR', 'Hand')
DISPLAY_NAMES = {
    'HeadCT': 'Head CT',
    'BreastMRI': 'Breast MRI',
    'AbdomenCT': 'Abdomen CT',
    'ChestCT': 'Chest CT',
    'CXR': 'CXR (X-ray)',
    'Hand': 'Hand X-ray',
}
NUM_CATEGORIES = len(CATEGORY_IDS)
IMAGE_SIZE = 64
LABEL_OF = {category_id: index for index, category_id in enumerate(CATEGORY_IDS)}


def label_of(category_id: str) -> int:
  """Label index of a category id; raises DataError naming the id when it is unknown."""
  from tff_medical.errors import DataError  # pylint: disable=g-import-not-at-top

  try:
    return LABEL_OF[category_id]
  except KeyError:
    raise DataError(
        f'Unknown category {category_id!r}. Known categories: {", ".join(CATEGORY_IDS)}.'
    ) from None
