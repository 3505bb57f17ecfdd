"""Keras classifiers for 64x64 grayscale images. No BatchNorm: it mixes examples across a batch,
which breaks per-example and per-client privacy accounting (GroupNorm would be the substitute)."""

import tensorflow as tf

from tff_medical import categories

INPUT_SHAPE = (categories.IMAGE_SIZE, categories.IMAGE_SIZE, 1)


HEADS = ('gap', 'flatten')


def build_cnn(conv_filters: tuple[int, ...] = (16, 32), dense_units: int = 0,
              num_classes: int = categories.NUM_CATEGORIES, seed: int = 0,
              input_pooling: int = 1, head: str = 'gap') -> tf.keras.Model:
  """A small CNN: optional input average pooling, conv/maxpool blocks, a head, softmax.

  Inputs are float32 in [0, 1], shape (batch, 64, 64, 1). Small on purpose: DP noise per
  coordinate grows with the model, and clients here train on CPUs.

  Args:
    input_pooling: average-pools the input by this factor first (1: none). 64x64 -> 16x16 keeps
      what tells the six categories apart and cuts client compute 16x.
    head: 'gap' (global average pooling: fewest parameters, but it discards where things are,
      and measured on the phantoms it needs several hundred steps) or 'flatten' (keeps the
      layout; reaches the same accuracy in tens of federated rounds, which is what DP can
      afford; see docs/BENCHMARKS.md).
  """
  if head not in HEADS:
    raise ValueError(f'head must be one of {HEADS}. Found {head!r}.')
  initializer = tf.keras.initializers.GlorotUniform(seed=seed)
  layers = [tf.keras.layers.InputLayer(input_shape=INPUT_SHAPE)]
  if input_pooling > 1:
    layers.append(tf.keras.layers.AveragePooling2D(input_pooling))
  for filters in conv_filters:
    layers += [
        tf.keras.layers.Conv2D(filters, 3, padding='same', activation='relu',
                               kernel_initializer=initializer),
        tf.keras.layers.MaxPool2D(2),
    ]
  layers.append(tf.keras.layers.GlobalAveragePooling2D() if head == 'gap' else
                tf.keras.layers.Flatten())
  if dense_units:
    layers.append(tf.keras.layers.Dense(dense_units, activation='relu',
                                        kernel_initializer=initializer))
  layers.append(tf.keras.layers.Dense(num_classes, activation='softmax',
                                      kernel_initializer=initializer))
  return tf.keras.Sequential(layers)
