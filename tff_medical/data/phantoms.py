"""Synthetic phantoms of the six categories: the embedded default data source.

Each image is drawn analytically (ellipses, capsules, arcs and smooth noise, all with one-pixel
soft edges) in a per-image anatomical frame that is rotated, scaled and shifted, then blurred,
windowed and noised. Batches are rendered at once with numpy (about 0.6-0.9 ms of CPU per
image, on threads); the shapes caricature each modality, they are not anatomy.

The task must not be trivial, or privacy-utility trade-offs could not be measured on it: Chest
CT and Abdomen CT are drawn by one renderer along a shared cranio-caudal slice position whose
ranges overlap (lower chest and upper abdomen look alike, as in real scans), and acquisition
variation (blur, noise, contrast) hides detail. One knob, `difficulty` in [0, 1], scales both.

Determinism: every chunk of images has its own generator seeded from (seed, stream, label,
chunk), so the same arguments give identical bytes whatever the thread scheduling.
"""

import concurrent.futures
import functools
import math
import numbers
import os
from typing import Callable, Mapping

import numpy as np

from tff_medical import categories
from tff_medical.data import source
from tff_medical.errors import DataError

SOURCE_NAME = 'phantoms'
# At 0.3 the small centralized CNN stays clearly below 100% test accuracy (see README).
DEFAULT_DIFFICULTY = 0.3
# Independent image streams for one seed: a test split must never repeat a training image.
TRAIN_STREAM = 0
TEST_STREAM = 1

_SIZE = categories.IMAGE_SIZE
_PIXEL = 2.0 / _SIZE  # Canonical coordinates span [-1, 1] across the image.
_GRID = ((np.arange(_SIZE, dtype=np.float32) + 0.5) * _PIXEL - 1.0).astype(np.float32)
# Images rendered together. Measured: with 8, each temporary (128 KiB) is reused from malloc's
# heap; with 32 or more, every temporary is fresh memory to page in, and threads scale worse.
_CHUNK = 8
_MAX_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Spawn key of the shuffle generator; labels use 0..5, so it can never collide with them.
_SHUFFLE_KEY = 1 << 16


class _Canvas:
  """Coordinates and random parameters for a batch of n images.

  Parameters are (n, 1, 1) float32 arrays, so every shape is drawn for all n images with one
  numpy expression. (u, v) are canonical coordinates: u to the image right, v downwards.
  """

  def __init__(self, rng: np.random.Generator, n: int, rotation_deg: float,
               scale_range: tuple[float, float], shift: float, mirror: bool = False):
    self.rng = rng
    self.n = n
    angle = self.normal(0.0, math.radians(rotation_deg))
    scale = self.uniform(*scale_range)
    tx, ty = self.uniform(-shift, shift), self.uniform(-shift, shift)
    cos, sin = np.cos(angle), np.sin(angle)
    x = _GRID[None, None, :] - tx
    y = _GRID[:, None] - ty
    self.u = (x * cos + y * sin) / scale
    self.v = (y * cos - x * sin) / scale
    if mirror:
      self.u *= np.where(rng.random((n, 1, 1)) < 0.5, -1.0, 1.0).astype(np.float32)
    # Pixels per canonical unit, so that every edge is one pixel wide whatever the scale.
    self.inv_px = (scale / _PIXEL).astype(np.float32)

  def uniform(self, low, high) -> np.ndarray:
    return self.rng.uniform(low, high, (self.n, 1, 1)).astype(np.float32)

  def normal(self, mean, std) -> np.ndarray:
    return self.rng.normal(mean, std, (self.n, 1, 1)).astype(np.float32)

  def bernoulli(self, p) -> np.ndarray:
    return (self.rng.random((self.n, 1, 1)) < p).astype(np.float32)

  def coverage(self, scaled: np.ndarray, offset) -> np.ndarray:
    """clip(offset - scaled, 0, 1) in place: coverage from a distance already in pixels."""
    np.subtract(offset, scaled, out=scaled)
    return np.clip(scaled, 0.0, 1.0, out=scaled)

  def ellipse(self, cx, cy, rx, ry, angle=None) -> np.ndarray:
    """Coverage in [0, 1] of an ellipse (axes rx, ry, rotated by angle radians)."""
    du, dv = self.u - cx, self.v - cy
    if angle is not None:
      cos, sin = np.cos(angle), np.sin(angle)
      du, dv = du * cos + dv * sin, dv * cos - du * sin
    # With q^2 = (du / rx)^2 + (dv / ry)^2, 1 on the outline, the signed distance in pixels
    # near it is (q - 1) * r * inv_px ~ k * (q^2 - 1) with k = r * inv_px / 2: no square root
    # per pixel. Scaling du and dv by sqrt(k) first saves one pass.
    root_k = np.sqrt(0.5 * np.minimum(rx, ry) * self.inv_px)
    du *= root_k / rx
    dv *= root_k / ry
    du *= du
    dv *= dv
    du += dv  # k * q^2.
    return self.coverage(du, 0.5 + root_k * root_k)

  def ray(self, x0, y0, dx, dy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates along and across the ray from (x0, y0) with unit direction (dx, dy).

    Returns (along + origin, across squared, origin): `along` is offset by the constant
    `origin`, which segment() takes back out, to save one pass over the pixels.
    """
    along = self.u * dx
    along += self.v * dy
    across = self.v * dx
    across -= self.u * dy
    across -= y0 * dx - x0 * dy
    across *= across
    return along, across, x0 * dx + y0 * dy

  def segment(self, ray, start, end, r) -> np.ndarray:
    """Coverage of the stretch [start, end] of a ray (from ray()) thickened by radius r."""
    along, across2, origin = ray
    d = along - (origin + 0.5 * (start + end))
    np.abs(d, out=d)
    d -= 0.5 * (end - start)
    np.maximum(d, 0.0, out=d)  # Distance along the ray beyond the ends; 0 beside it.
    d *= d
    d += across2
    np.sqrt(d, out=d)
    d *= self.inv_px
    return self.coverage(d, 0.5 + r * self.inv_px)

  def capsule(self, x0, y0, x1, y1, r) -> np.ndarray:
    """Coverage of a segment from (x0, y0) to (x1, y1) thickened by radius r (a bone)."""
    dx, dy = x1 - x0, y1 - y0
    length = np.sqrt(dx * dx + dy * dy) + 1e-6
    return self.segment(self.ray(x0, y0, dx / length, dy / length), 0.0, length, r)

  def texture(self, cells: int) -> np.ndarray:
    """Smooth noise with about `cells` blobs across the image, mean 0 and std about 1."""
    basis = _texture_basis(cells)
    coarse = self.rng.standard_normal((self.n, cells, cells), dtype=np.float32)
    return basis @ coarse @ basis.T

  def grain(self) -> np.ndarray:
    """Fine noise correlated over about two pixels, mean 0 and std about 1."""
    field = self.rng.random((self.n, _SIZE, _SIZE), dtype=np.float32)
    field -= 0.5
    field = _binomial_blur(field)
    field *= 1.0 / 0.081  # The std of uniform noise (0.289) after the blur (x 0.28).
    return field

  def sparse_dots(self, density: float) -> np.ndarray:
    """Isolated bright pixels (1.0) with the given density; the blur makes them round."""
    return (self.rng.random((self.n, _SIZE, _SIZE), dtype=np.float32) < density).astype(
        np.float32)


# BLAS goes multithreaded (and slow, against the generator's own threads) above about this.
_MAX_TEXTURE_CELLS = 12


@functools.lru_cache(maxsize=None)
def _texture_basis(cells: int) -> np.ndarray:
  """(64, cells) Gaussian interpolation weights: a coarse grid to a smooth 64-pixel field.

  Scaled so that basis @ N(0, 1) @ basis.T has unit variance away from the borders, which
  saves normalising every field.
  """
  if cells > _MAX_TEXTURE_CELLS:
    raise ValueError(f'cells must be at most {_MAX_TEXTURE_CELLS}. Found {cells}.')
  centres = (np.arange(cells) + 0.5) * (2.0 / cells) - 1.0
  width = 2.0 / cells
  weights = np.exp(-0.5 * ((_GRID[:, None] - centres[None, :]) / width) ** 2)
  weights /= np.sqrt(np.median((weights ** 2).sum(axis=1)))
  return weights.astype(np.float32)


def _paint(image: np.ndarray, mask: np.ndarray, value) -> None:
  """Draws value over image where mask is 1 (alpha blending, in place)."""
  image += mask * (value - image)


# ---- Renderers: each returns float intensities, roughly in [0, 1], for a whole batch. ----


def _head_ct(c: _Canvas, difficulty: float) -> np.ndarray:
  """Axial head CT: scalp, bright skull ring, brain with ventricles; skull base or vertex."""
  del difficulty  # Acquisition variation is added for every category alike.
  level = c.uniform(0.0, 1.0)  # 0 = skull base, 1 = vertex.
  shrink = 1.0 - 0.3 * np.clip((level - 0.7) / 0.3, 0.0, 1.0)
  rx = c.uniform(0.55, 0.72) * shrink
  ry = rx * c.uniform(1.1, 1.3)
  cx, cy = c.normal(0.0, 0.02), c.uniform(-0.06, 0.06)
  skull = c.uniform(0.035, 0.08)
  brain_value = c.uniform(0.36, 0.5)
  image = np.zeros((c.n, _SIZE, _SIZE), np.float32)
  _paint(image, c.ellipse(cx, cy, rx + 0.035, ry + 0.035), c.uniform(0.25, 0.35))
  _paint(image, c.ellipse(cx, cy, rx, ry), c.uniform(0.85, 1.0))
  brain = c.ellipse(cx, cy, rx - skull, ry - skull)
  _paint(image, brain, brain_value + 0.03 * c.texture(8))
  # White matter is slightly darker than the cortex around it.
  _paint(image, c.ellipse(cx, cy, (rx - skull) * 0.75, (ry - skull) * 0.78),
         brain_value - c.uniform(0.02, 0.06))
  # Lateral ventricles: a dark butterfly at mid levels, its size varying with age.
  mid = ((level > 0.25) & (level < 0.8)).astype(np.float32)
  size = c.uniform(0.6, 1.5) * rx / 0.65
  csf = c.uniform(0.12, 0.22)
  for side in (-1.0, 1.0):
    mask = c.ellipse(cx + side * 0.07 * size, cy - 0.04, 0.035 * size, 0.16 * size,
                     angle=side * c.uniform(0.2, 0.45))
    _paint(image, mask * mid, csf)
  _paint(image, c.ellipse(cx, cy + 0.12 * size, 0.012 * size + 0.005, 0.06 * size) * mid, csf)
  # Falx: a faint bright midline.
  _paint(image, c.capsule(cx, cy - ry + skull + 0.03, cx, cy + ry - skull - 0.03, 0.008),
         brain_value + 0.12)
  # Skull base: orbits or sinuses (air) in front, petrous bones behind.
  base = (level < 0.25).astype(np.float32)
  for side in (-1.0, 1.0):
    _paint(image, base * c.ellipse(cx + side * 0.22 * rx / 0.65, cy - 0.72 * ry,
                                   0.12 * rx, 0.1 * ry), c.uniform(0.0, 0.1))
    _paint(image, base * c.capsule(cx + side * 0.12, cy + 0.05, cx + side * 0.45 * rx,
                                   cy + 0.35 * ry, 0.03), 0.9)
  # A head holder under some patients.
  holder = c.bernoulli(0.5)
  arc = c.ellipse(cx, cy + 0.05, rx + 0.16, ry + 0.1) - c.ellipse(cx, cy + 0.05, rx + 0.12,
                                                                   ry + 0.06)
  _paint(image, holder * arc * np.clip((c.v - cy - 0.5 * ry) * 8.0, 0.0, 1.0), 0.45)
  return image


def _axial_torso(c: _Canvas, level: np.ndarray) -> np.ndarray:
  """Axial CT of the trunk at a cranio-caudal level (0 = upper chest, 1 = lower abdomen).

  Chest CT and Abdomen CT share this renderer, so that near the diaphragm they look alike.
  """
  lungs = np.clip(1.25 - 1.5 * level, 0.0, 1.0)  # Lung fields shrink towards the diaphragm.
  liver = np.clip((level - 0.3) / 0.35, 0.0, 1.0)
  heart = np.clip(1.0 - level / 0.5, 0.0, 1.0)
  kidneys = (level > c.uniform(0.45, 0.65)).astype(np.float32)
  bowel = np.clip((level - 0.45) / 0.3, 0.0, 1.0)
  rx = c.uniform(0.72, 0.92)
  ry = rx * c.uniform(0.6, 0.8)
  cx, cy = c.normal(0.0, 0.02), c.uniform(-0.04, 0.1)
  fat = c.uniform(0.03, 0.12)
  tissue = c.uniform(0.48, 0.58)
  image = np.zeros((c.n, _SIZE, _SIZE), np.float32)
  # The table the patient lies on.
  _paint(image, c.bernoulli(0.6) * c.capsule(cx - rx, cy + ry + 0.08, cx + rx, cy + ry + 0.08,
                                             0.02), 0.5)
  _paint(image, c.ellipse(cx, cy, rx, ry), c.uniform(0.26, 0.36))  # Subcutaneous fat.
  _paint(image, c.ellipse(cx, cy, rx - fat, ry - fat), tissue + 0.025 * c.texture(10))
  # Abdominal organs (painted first: at the diaphragm the lungs wrap around the liver dome).
  _paint(image, c.ellipse(cx - 0.33 * rx, cy - 0.05 * ry, 0.5 * rx * liver + 1e-3,
                          0.62 * ry * liver + 1e-3, angle=c.uniform(-0.5, -0.1)),
         c.uniform(0.6, 0.7))
  stomach = ((level > 0.35) & (level < 0.8)).astype(np.float32)
  gx, gy = cx + 0.35 * rx, cy - 0.3 * ry
  _paint(image, stomach * c.ellipse(gx, gy, 0.22 * rx, 0.16 * ry), c.uniform(0.45, 0.55))
  _paint(image, stomach * c.ellipse(gx, gy - 0.08 * ry, 0.16 * rx, 0.07 * ry), 0.05)
  # Bowel loops: fluid-filled tubes and gas pockets from a thresholded smooth field.
  loops = c.texture(9)
  region = c.ellipse(cx, cy - 0.05 * ry, 0.62 * rx, 0.55 * ry) * bowel
  _paint(image, region * np.clip((loops - 0.2) * 3.0, 0.0, 1.0), c.uniform(0.58, 0.7))
  _paint(image, region * np.clip((-loops - 1.0) * 3.0, 0.0, 1.0), 0.04)
  for side in (-1.0, 1.0):
    kidney = c.ellipse(cx + side * 0.33 * rx, cy + 0.3 * ry, 0.09, 0.14, angle=side * 0.4)
    _paint(image, kidney * kidneys, c.uniform(0.7, 0.8))
    _paint(image, kidneys * c.ellipse(cx + side * 0.3 * rx, cy + 0.3 * ry, 0.025, 0.05), 0.4)
  # Lungs: dark fields with bright vessel dots; they slide backwards as they shrink.
  vessels = c.sparse_dots(0.03)
  lung_value = c.uniform(0.02, 0.12) + 0.35 * vessels
  for side in (-1.0, 1.0):
    scale = lungs ** 0.6
    lung = c.ellipse(cx + side * 0.44 * rx, cy - 0.05 * ry + 0.35 * ry * (1.0 - lungs),
                     0.34 * rx * scale + 1e-3, 0.62 * ry * lungs + 1e-3,
                     angle=side * c.uniform(-0.2, 0.1))
    _paint(image, lung, lung_value)
  # Mediastinum: heart, and the aorta in front of the spine.
  _paint(image, c.ellipse(cx + 0.08 * rx, cy - 0.1 * ry, 0.28 * rx * heart + 1e-3,
                          0.34 * ry * heart + 1e-3, angle=c.uniform(-0.6, -0.2)),
         c.uniform(0.58, 0.66))
  _paint(image, c.ellipse(cx + 0.04 * rx, cy + 0.3 * ry, 0.05, 0.05), c.uniform(0.65, 0.8))
  # Spine: vertebral body, canal, spinous process; sternum in front at chest levels.
  sy = cy + ry * 0.58
  _paint(image, c.ellipse(cx, sy, 0.1, 0.09), c.uniform(0.85, 1.0))
  _paint(image, c.ellipse(cx, sy, 0.07, 0.06), c.uniform(0.7, 0.8))
  _paint(image, c.ellipse(cx, sy + 0.13, 0.035, 0.03), tissue)
  _paint(image, c.capsule(cx, sy + 0.17, cx, cy + ry - fat - 0.03, 0.02), 0.9)
  _paint(image, heart * c.ellipse(cx, cy - ry + fat + 0.05, 0.04, 0.025), 0.9)
  return image


def _chest_ct(c: _Canvas, difficulty: float) -> np.ndarray:
  return _axial_torso(c, c.uniform(0.0, 0.5 + _torso_overlap(difficulty)))


def _abdomen_ct(c: _Canvas, difficulty: float) -> np.ndarray:
  return _axial_torso(c, c.uniform(0.5 - _torso_overlap(difficulty), 1.0))


def _torso_overlap(difficulty: float) -> float:
  """Half-width of the slice range that Chest CT and Abdomen CT share."""
  return 0.2 * difficulty


def _cxr(c: _Canvas, difficulty: float) -> np.ndarray:
  """Frontal chest X-ray: dark lungs crossed by rib arcs, heart shadow, spine, clavicles."""
  del difficulty
  image = np.zeros((c.n, _SIZE, _SIZE), np.float32)
  tissue = c.uniform(0.45, 0.6)
  width = c.uniform(0.95, 1.15)
  _paint(image, c.ellipse(0.0, 0.5, width, 1.3), tissue)  # Trunk, filling the film.
  for side in (-1.0, 1.0):  # Shoulders and humeral heads.
    _paint(image, c.ellipse(side * 0.72, -0.6, 0.42, 0.3, angle=side * 0.3), tissue)
    _paint(image, c.ellipse(side * 0.95, -0.6, 0.13, 0.14), c.uniform(0.7, 0.85))
  _paint(image, c.capsule(0.0, -1.2, 0.0, -0.7, 0.22), tissue)  # Neck.
  lung_value = c.uniform(0.1, 0.26) + 0.04 * c.texture(12)
  height = c.uniform(0.42, 0.55)
  for side in (-1.0, 1.0):
    lung = c.ellipse(side * c.uniform(0.32, 0.4), -0.05, c.uniform(0.24, 0.32), height,
                     angle=side * c.uniform(-0.05, 0.15))
    _paint(image, lung, lung_value)
    # Diaphragm domes cut the lung bases.
    _paint(image, c.ellipse(side * 0.36, -0.05 + height * 0.95, 0.4, 0.16), tissue + 0.05)
  # Ribs: posterior arcs, rising from the spine then curving down laterally.
  # Ribs: nine posterior arcs per side, rising from the spine then curving down laterally;
  # drawn at once as one periodic pattern in t, the height above the top rib's curve.
  spacing = c.uniform(0.085, 0.11)
  lateral = np.abs(c.u)
  t = c.v + 0.62
  t += 0.25 * lateral
  t -= c.uniform(0.6, 1.0) * lateral * lateral
  phase = t / spacing
  d = np.abs(phase - np.round(phase))
  d *= spacing
  d -= 0.24 * spacing  # Half the rib's width.
  np.maximum(d, np.maximum(0.06 - lateral, lateral - 0.7), out=d)  # From spine to flank.
  np.maximum(d, np.maximum(-t, t - 8.0 * spacing), out=d)  # Only nine ribs.
  d *= c.inv_px
  ribs = c.coverage(d, 0.5)
  image += c.uniform(0.1, 0.22) * ribs
  # Mediastinum and spine; heart shadow to the patient's left (the image right).
  _paint(image, c.capsule(0.0, -0.9, 0.0, 1.2, c.uniform(0.09, 0.13)), tissue + 0.1)
  _paint(image, c.ellipse(c.uniform(0.06, 0.16), c.uniform(0.15, 0.3), c.uniform(0.2, 0.3),
                          c.uniform(0.17, 0.23), angle=-0.35), tissue + 0.08)
  for side in (-1.0, 1.0):  # Clavicles.
    y = c.uniform(-0.66, -0.55)
    image += 0.15 * c.capsule(side * 0.08, y, side * 0.55, y - c.uniform(0.02, 0.12), 0.03)
  return image


def _hand(c: _Canvas, difficulty: float) -> np.ndarray:
  """Hand radiograph: metacarpals and phalanges as bright segments, carpals, forearm bones."""
  del difficulty
  image = np.full((c.n, _SIZE, _SIZE), 0.04, np.float32)
  bones = np.zeros_like(image)
  soft = c.uniform(0.15, 0.25)
  bone = c.uniform(0.65, 0.85)
  spread = c.uniform(0.06, 0.22)
  size = c.uniform(0.85, 1.1)
  gap = 0.03 * size  # Joint space.
  _paint(image, c.ellipse(0.0, 0.25 * size, 0.32 * size, 0.4 * size), soft)  # Palm.
  _paint(image, c.capsule(0.0, 0.6, 0.0, 1.3, 0.25), soft)  # Wrist and forearm.
  # (base x, metacarpal, proximal, middle, distal lengths), index finger to little finger.
  fingers = ((-0.13, 0.42, 0.27, 0.17, 0.12), (-0.04, 0.4, 0.3, 0.19, 0.12),
             (0.05, 0.37, 0.27, 0.17, 0.11), (0.13, 0.33, 0.22, 0.13, 0.1))
  radii = (0.034, 0.03, 0.025, 0.02)
  # Thumb: three bones on one ray pointing out to the side.
  angle = c.uniform(-1.1, -0.6)
  chains = [((-0.17, 0.6), angle, (0.26, 0.2, 0.14), (0.035, 0.03, 0.024))]
  for i, (bx, metacarpal, *phalanges) in enumerate(fingers):
    angle = (i - 1.5) * spread + c.normal(0.0, 0.03)
    ray = c.ray(bx * size, 0.48 * size, np.sin(angle), -np.cos(angle))
    np.maximum(bones, c.segment(ray, 0.0, metacarpal * size, radii[0] * size), out=bones)
    _paint(bones, c.segment(ray, 0.0, metacarpal * size, 0.45 * radii[0] * size), 0.75)
    head = (bx + np.sin(angle) * (metacarpal + 0.03), 0.48 - np.cos(angle) * (metacarpal + 0.03))
    # The fingers fan out further than the metacarpals.
    chains.append((head, angle + (i - 1.5) * spread * 0.5, phalanges, radii[1:]))
  for (x, y), angle, lengths, chain_radii in chains:
    ray = c.ray(x * size, y * size, np.sin(angle), -np.cos(angle))
    start = 0.0
    for length, radius in zip(lengths, chain_radii):
      end = start + length * size
      np.maximum(bones, c.segment(ray, start, end, radius * size), out=bones)
      start = end + gap
    _paint(image, c.segment(ray, -0.1 * size, start - gap, 0.065 * size), soft)
  # Carpals: a cluster of rounded bones in two rows, drawn as one periodic pattern.
  cu = (c.u - c.normal(0.0, 0.02) * size) * (1.0 / (0.09 * size)) + 0.5
  cv = (c.v - 0.58 * size) * (1.0 / (0.1 * size)) + 0.5
  cu -= np.round(cu)
  cv -= np.round(cv)
  cu *= cu
  cv *= cv
  cu += cv  # Squared distance, in cells, to the nearest carpal's centre.
  carpals = np.clip((0.2 - cu) * 8.0, 0.0, 1.0) * c.ellipse(0.0, 0.63 * size, 0.2 * size,
                                                               0.11 * size)
  np.maximum(bones, 0.95 * carpals, out=bones)
  # Radius and ulna.
  np.maximum(bones, c.capsule(-0.1 * size, 0.82 * size, -0.12 * size, 1.6, 0.075 * size),
             out=bones)
  np.maximum(bones, c.capsule(0.14 * size, 0.82 * size, 0.16 * size, 1.6, 0.05 * size),
             out=bones)
  image += bones * (bone - image)
  return image


def _breast_mri(c: _Canvas, difficulty: float) -> np.ndarray:
  """Axial T1 breast MRI: two bright fatty lobes with dark fibroglandular strands, chest wall."""
  del difficulty
  image = np.zeros((c.n, _SIZE, _SIZE), np.float32)
  fat = c.uniform(0.65, 0.85)
  gland = c.uniform(0.2, 0.35)
  density = c.uniform(-0.8, 0.8)  # Threshold of the glandular blobs: dense to fatty.
  wall = c.uniform(-0.55, -0.35)  # Chest wall; the breasts hang below it (prone imaging).
  blobs = 0.7 * c.texture(12) + 0.7 * c.grain()
  strands = np.abs(c.texture(12))
  # Fibroglandular tissue: blobs and the thin ducts and ligaments (zero crossings) around them.
  tissue = np.maximum(np.clip((blobs - density) * 3.0, 0.0, 1.0),
                      np.clip((0.3 - strands) * 4.0, 0.0, 1.0))
  for side in (-1.0, 1.0):
    rx, ry = c.uniform(0.34, 0.46), c.uniform(0.4, 0.6)
    bx, by = side * c.uniform(0.38, 0.5), wall + ry * c.uniform(0.2, 0.5)
    angle = side * c.uniform(-0.35, 0.1)
    lobe = c.ellipse(bx, by, rx, ry, angle=angle)
    _paint(image, lobe, fat)
    inner = c.ellipse(bx, by, rx - 0.06, ry - 0.06, angle=angle)  # Spare the skin and fat.
    _paint(image, inner * tissue, gland)
    tip = by + ry * np.cos(angle)
    _paint(image, c.ellipse(bx - ry * np.sin(angle), tip, 0.05, 0.04), fat * 0.8)  # Nipple.
  # Thorax over the lobe bases: fat, pectoral muscle, dark lungs, heart.
  _paint(image, c.ellipse(0.0, wall - 0.35, 1.1, 0.45), fat)
  _paint(image, c.ellipse(0.0, wall - 0.4, 0.95, 0.37), c.uniform(0.25, 0.35))
  _paint(image, c.ellipse(0.0, wall - 0.5, 0.7, 0.3), c.uniform(0.02, 0.08))
  _paint(image, c.ellipse(0.0, wall - 0.35, 0.22, 0.2), c.uniform(0.2, 0.3))
  # Coil sensitivity: brightness falls off away from the breast coil.
  image *= 1.0 + c.uniform(0.1, 0.4) * (c.v - 0.3) + c.normal(0.0, 0.1) * c.u
  flip = c.bernoulli(0.3)  # Some sites display the patient supine.
  image = flip * image[:, ::-1, :] + (1.0 - flip) * image
  return image


_Renderer = Callable[[_Canvas, float], np.ndarray]
_RENDERERS: dict[str, _Renderer] = {
    'HeadCT': _head_ct,
    'BreastMRI': _breast_mri,
    'AbdomenCT': _abdomen_ct,
    'ChestCT': _chest_ct,
    'CXR': _cxr,
    'Hand': _hand,
}
assert tuple(_RENDERERS) == categories.CATEGORY_IDS


def _render(category_id: str, n: int, rng: np.random.Generator,
            difficulty: float) -> np.ndarray:
  """n uint8 images of one category: anatomy, then acquisition (blur, window, noise)."""
  hand = category_id == 'Hand'
  canvas = _Canvas(
      rng, n,
      rotation_deg=(10.0 + 20.0 * difficulty) if hand else (3.0 + 10.0 * difficulty),
      scale_range=(0.95 - 0.2 * difficulty, 1.05 + 0.15 * difficulty),
      shift=0.03 + 0.12 * difficulty, mirror=hand)
  image = _RENDERERS[category_id](canvas, difficulty)
  image = _blur(image, canvas.uniform(0.3, 0.5 + 1.5 * difficulty))
  # Window and gamma: scanners and viewers map intensities differently.
  low = canvas.uniform(-0.1, 0.1 * difficulty)
  high = canvas.uniform(0.9 - 0.25 * difficulty, 1.1)
  image = np.clip((image - low) / (high - low), 0.0, 1.0)
  image **= np.exp(canvas.normal(0.0, 0.15 + 0.2 * difficulty))
  sigma = canvas.uniform(0.005, 0.02 + 0.08 * difficulty)
  # Uniform rather than Gaussian noise: at 8 bits they look alike, and it is 4x cheaper.
  noise = canvas.rng.random(image.shape, dtype=np.float32)
  noise -= 0.5
  noise *= sigma * math.sqrt(12.0)
  image += noise
  image *= 255.0
  image += 0.5
  return np.clip(image, 0.0, 255.0, out=image).astype(np.uint8)


def _blur(image: np.ndarray, sigma_px: np.ndarray) -> np.ndarray:
  """Blur of a per-image width sigma_px (pixels, at most 2), edges replicated.

  Mixes the image with 1 to 4 passes of a fixed binomial kernel (variance 1 px^2 each), two
  neighbouring levels per image weighted so that the variance is exactly sigma_px^2. Cheaper
  than per-image Gaussian kernels, and free of 64x64 matrix products, whose BLAS threads fight
  the generator's own threads.
  """
  variance = np.minimum(sigma_px * sigma_px, 4.0)
  levels = int(math.ceil(float(variance.max())))
  out = np.maximum(1.0 - variance, 0.0) * image
  level = image
  for k in range(1, levels + 1):
    level = _binomial_blur(level)
    out += np.maximum(1.0 - np.abs(variance - k), 0.0) * level
  return out


def _binomial_blur(image: np.ndarray) -> np.ndarray:
  """[1, 4, 6, 4, 1] / 16 blur along both axes (variance 1 px^2), edges replicated."""
  out = image
  for axis in (1, 2, 1, 2):  # [1, 2, 1] / 4 twice per axis; slices avoid a padded copy.
    out = _triangle(out, axis)
  out *= 1.0 / 256.0
  return out


def _triangle(image: np.ndarray, axis: int) -> np.ndarray:
  """Unnormalised [1, 2, 1] along one axis, edges replicated."""
  inner = [slice(None)] * 3
  inner[axis] = slice(1, None)
  head = tuple(inner)
  inner[axis] = slice(None, -1)
  tail = tuple(inner)
  out = image * 2.0
  out[head] += image[tail]
  out[tail] += image[head]
  inner[axis] = slice(0, 1)
  out[tuple(inner)] += image[tuple(inner)]
  inner[axis] = slice(-1, None)
  out[tuple(inner)] += image[tuple(inner)]
  return out


def _check_difficulty(difficulty) -> float:
  if (isinstance(difficulty, bool) or not isinstance(difficulty, numbers.Real) or
      not 0.0 <= difficulty <= 1.0):
    raise DataError(f'difficulty must be a number in [0, 1]. Found {difficulty!r}.')
  return float(difficulty)


def _check_count(what: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise DataError(f'{what} must be a non-negative integer. Found {value!r}.')
  return int(value)


def generate_one(category_id: str, rng: np.random.Generator, *,
                 difficulty: float = DEFAULT_DIFFICULTY) -> np.ndarray:
  """One uint8 (64, 64) image of `category_id`, drawn from `rng`."""
  categories.label_of(category_id)  # DataError for an unknown id.
  return _render(category_id, 1, rng, _check_difficulty(difficulty))[0]


def generate(num_per_category: int | Mapping[str, int], seed: int = 0, *,
             difficulty: float = DEFAULT_DIFFICULTY, stream: int = TRAIN_STREAM
             ) -> source.LabeledImages:
  """Phantom images of every category, shuffled; the same arguments give identical bytes.

  Args:
    num_per_category: images of each category (exact balance), or a mapping from category id
      to count; categories missing from the mapping get none.
    seed: non-negative integer seed.
    difficulty: in [0, 1]. Scales the slices Chest CT and Abdomen CT share (none at 0;
      at the default 0.3, about a fifth of each one's slices), pose variation (rotation,
      scale, shift), blur (sigma up to 0.5 + 1.5 * difficulty pixels), window and gamma
      spread, and noise (std up to 0.02 + 0.08 * difficulty of full scale). At the default,
      the centralized CNN stays well below 100% test accuracy (experiments/baseline.py).
    stream: independent sample streams for one seed (TRAIN_STREAM, TEST_STREAM).

  Returns:
    LabeledImages whose labels index categories.CATEGORY_IDS.

  Raises:
    DataError: an unknown category id, a negative count, or a bad seed or difficulty.
  """
  difficulty = _check_difficulty(difficulty)
  seed = _check_count('seed', seed)
  stream = _check_count('stream', stream)
  if isinstance(num_per_category, Mapping):
    counts = [0] * categories.NUM_CATEGORIES
    for category_id, count in num_per_category.items():
      counts[categories.label_of(category_id)] = _check_count(
          f'number of {category_id} images', count)
  else:
    counts = [_check_count('num_per_category', num_per_category)] * categories.NUM_CATEGORIES

  total = sum(counts)
  images = np.empty((total, _SIZE, _SIZE), np.uint8)
  labels = np.empty((total,), np.int32)
  jobs = []  # (category_id, label, chunk index, offset, size)
  offset = 0
  for label, (category_id, count) in enumerate(zip(categories.CATEGORY_IDS, counts)):
    labels[offset:offset + count] = label
    for chunk, start in enumerate(range(0, count, _CHUNK)):
      jobs.append((category_id, label, chunk, offset + start, min(_CHUNK, count - start)))
    offset += count

  def run(job):
    category_id, label, chunk, start, size = job
    rng = np.random.default_rng([seed, stream, label, chunk])
    images[start:start + size] = _render(category_id, size, rng, difficulty)

  # numpy releases the GIL inside large array operations, so threads use every core.
  with concurrent.futures.ThreadPoolExecutor(_MAX_WORKERS) as pool:
    for _ in pool.map(run, jobs):
      pass  # Re-raises any worker's exception here.

  order = np.random.default_rng([seed, stream, _SHUFFLE_KEY]).permutation(total)
  report = source.LoadReport(source=SOURCE_NAME, loaded=total)
  return source.LabeledImages(images=images[order], labels=labels[order], report=report)


def example_grid(per_category: int = 8, seed: int = 0, *,
                 difficulty: float = DEFAULT_DIFFICULTY) -> np.ndarray:
  """A uint8 mosaic: one row per category in label order, `per_category` images across."""
  data = generate(per_category, seed, difficulty=difficulty)
  border = 128  # Mid-gray lines, so that dark backgrounds of neighbours stay apart.
  rows = []
  for label in range(categories.NUM_CATEGORIES):
    tiles = [np.pad(image, 1, constant_values=border)
             for image in data.images[data.labels == label]]
    rows.append(np.concatenate(tiles, axis=1))
  return np.concatenate(rows, axis=0)


def save_example_grid(path: str, per_category: int = 8, seed: int = 0, *,
                      difficulty: float = DEFAULT_DIFFICULTY, zoom: int = 2) -> None:
  """Writes example_grid() as a PNG, each pixel repeated zoom x zoom (docs/phantoms.png)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  grid = example_grid(per_category, seed, difficulty=difficulty)
  Image.fromarray(np.kron(grid, np.ones((zoom, zoom), np.uint8))).save(path)
