"""What every image source returns: images, labels and a report of what was skipped."""

import dataclasses
import os

import numpy as np

from tff_medical import categories


@dataclasses.dataclass(frozen=True)
class SkippedFile:
  """A file a loader could not use. `path` is relative to the source root; no header content."""

  path: str
  reason: str


@dataclasses.dataclass
class LoadReport:
  """Counts of what a loader used and skipped, so that one bad file never ends a run silently."""

  source: str
  loaded: int = 0
  skipped: list[SkippedFile] = dataclasses.field(default_factory=list)

  def skip(self, path: str, reason: str) -> None:
    self.skipped.append(SkippedFile(path=path, reason=reason))

  def reasons(self) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in self.skipped:
      counts[s.reason] = counts.get(s.reason, 0) + 1
    return counts

  def summary(self) -> str:
    text = f'{self.source}: {self.loaded} images loaded, {len(self.skipped)} files skipped'
    if self.skipped:
      text += ' (' + ', '.join(f'{n} {r}' for r, n in sorted(self.reasons().items())) + ')'
    return text


@dataclasses.dataclass
class LabeledImages:
  """A whole source in memory: uint8 images (N, 64, 64) and int32 labels (N,) in label order."""

  images: np.ndarray
  labels: np.ndarray
  report: LoadReport

  def __post_init__(self):
    size = categories.IMAGE_SIZE
    if self.images.dtype != np.uint8 or self.images.ndim != 3 or self.images.shape[1:] != (
        size, size):
      raise ValueError(f'images must be uint8 of shape (N, {size}, {size}). '
                       f'Found {self.images.dtype} {self.images.shape}.')
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(f'labels must have shape ({self.images.shape[0]},). '
                       f'Found {self.labels.shape}.')
    self.labels = self.labels.astype(np.int32)

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def category_counts(self) -> dict[str, int]:
    counts = np.bincount(self.labels, minlength=categories.NUM_CATEGORIES)
    return {c: int(counts[i]) for i, c in enumerate(categories.CATEGORY_IDS)}


def visible_files(root: str) -> list[str]:
  """Files under `root`, '/'-separated and relative to it, in a stable walk order.

  Hidden files and folders are left out. Symlinked folders are followed (a common way to
  assemble a data set), each real folder once, so that a link loop cannot recurse forever.
  """
  paths = []
  visited = set()
  for directory, subdirs, files in os.walk(root, followlinks=True):
    real = os.path.realpath(directory)
    if real in visited:
      subdirs[:] = []
      continue
    visited.add(real)
    subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
    rel_dir = os.path.relpath(directory, root)
    for name in sorted(files):
      if not name.startswith('.'):
        rel = name if rel_dir == '.' else os.path.join(rel_dir, name)
        paths.append(rel.replace(os.sep, '/'))
  return paths
