"""Keras classifiers for 64x64 grayscale images. No BatchNorm: it mixes examples across a batch,
which breaks per-example and per-client privacy accounting (GroupNorm would be the substitute)."""

import tensorflow as tf

from tff_medical import categories

INPUT_SHAPE = (categories.IMAGE_SIZE, categories.IMAGE_SIZE, 1)


def build_cnn(conv_filters: tuple[int, ...] = (16, 32), dense_units: int = 0,
              num_classes: int = categories.NUM_CATEGORIES, seed: int = 0) -> tf.keras.Model:
  """A small CNN: conv/maxpool blocks, global average pooling, softmax.

  Inputs are float32 in [0, 1], shape (batch, 64, 64, 1). Small on purpose: DP noise per
  coordinate grows with the model, and clients here train on CPUs.
  """
  initializer = tf.keras.initializers.GlorotUniform(seed=seed)
  layers = [tf.keras.layers.InputLayer(input_shape=INPUT_SHAPE)]
  for filters in conv_filters:
    layers += [
        tf.keras.layers.Conv2D(filters, 3, padding='same', activation='relu',
                               kernel_initializer=initializer),
        tf.keras.layers.MaxPool2D(2),
    ]
  layers.append(tf.keras.layers.GlobalAveragePooling2D())
  if dense_units:
    layers.append(tf.keras.layers.Dense(dense_units, activation='relu',
                                        kernel_initializer=initializer))
  layers.append(tf.keras.layers.Dense(num_classes, activation='softmax',
                                      kernel_initializer=initializer))
  return tf.keras.Sequential(layers)
