"""The model's input scaling: uint8 pixels -> float32 in [0, 1], in NumPy or in a TF graph."""

from typing import TypeVar

import numpy as np
import tensorflow as tf

_MAX_PIXEL = 255.0

ArrayOrTensor = TypeVar('ArrayOrTensor', np.ndarray, tf.Tensor)


def scale_pixels(pixels: ArrayOrTensor) -> ArrayOrTensor:
  """uint8 pixels of any shape -> float32 in [0, 1], same shape; a tensor stays in the graph.

  A division: NumPy and eager TF give the same bits. Grappler may turn it into a multiplication
  by 1/255 inside a traced graph (tf.data maps, the serving signature): 1 ulp at most.
  """
  if isinstance(pixels, np.ndarray):
    return pixels.astype(np.float32) / _MAX_PIXEL
  return tf.cast(pixels, tf.float32) / _MAX_PIXEL


def to_model_input(images: ArrayOrTensor) -> ArrayOrTensor:
  """uint8 [..., 64, 64] -> the CNN's input: float32 [..., 64, 64, 1] in [0, 1]."""
  if isinstance(images, np.ndarray):
    return scale_pixels(images)[..., np.newaxis]
  return tf.expand_dims(scale_pixels(images), -1)
