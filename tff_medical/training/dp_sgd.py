"""Example-level DP-SGD inside a site, with a budget per category (privacy_unit 'example').

Mechanism and timings: docs/DESIGN.md; its privacy derivation: docs/PRIVACY.md.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import dp_accounting
import numpy as np
import tensorflow as tf

from tff_medical import categories
from tff_medical.errors import PolicyError
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration
from tff_medical.privacy.policy import PrivacyPolicy
from tff_medical.privacy.sampling import SamplingSpec
from tff_medical.training.local_training import ClientOutput

NUM_CATEGORIES = categories.NUM_CATEGORIES


def example_sampling(examples: int, expected_batch_size: int) -> SamplingSpec:
  """Poisson sampling of a site's examples into a step's batch, as a SamplingSpec (rate b / n)."""
  examples = accounting.positive_int('examples', examples)
  batch = accounting.positive_int('expected_batch_size', expected_batch_size)
  if batch > examples:
    raise PolicyError(f'expected_batch_size must be at most the site\'s examples ({examples}). '
                      f'Found {batch}.')
  return SamplingSpec('poisson', examples, batch)


@dataclasses.dataclass(frozen=True)
class SitePlan:
  """A site's calibrated DP-SGD: what it applies each step and what the accountant is told.

  Attributes:
    examples: n, the site's training examples.
    expected_batch_size: b; each example is in a step's batch with probability q = b / n.
    planned_steps: Steps the multipliers were calibrated for.
    l2_norm_clip: C, the configured clip norm.
    noise_multipliers: z_c per category (CATEGORY_IDS order).
    category_counts: The site's examples per category (weights of the scale).
    scale: s, the data-weighted mean of the z_c.
  """

  examples: int
  expected_batch_size: int
  planned_steps: int
  l2_norm_clip: float
  noise_multipliers: dict[str, float]
  category_counts: dict[str, int]
  scale: float

  @property
  def sampling(self) -> SamplingSpec:
    return example_sampling(self.examples, self.expected_batch_size)

  @property
  def rate(self) -> float:
    return self.sampling.rate

  @property
  def noise_stddev(self) -> float:
    """s C: the stddev of the one noise draw per step and coordinate."""
    return self.scale * self.l2_norm_clip

  def clip_norms(self, released: Optional[Sequence[str]] = None) -> dict[str, float]:
    """C_c = C s / z_c per category; 0 for a category not in `released` (frozen)."""
    released = categories.CATEGORY_IDS if released is None else released
    return {c: (self.l2_norm_clip * self.scale / self.noise_multipliers[c]
                if c in released else 0.0) for c in categories.CATEGORY_IDS}

  def to_json_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), rate=self.rate, noise_stddev=self.noise_stddev,
                clip_norms=self.clip_norms())

  @classmethod
  def from_json_dict(cls, value: Mapping[str, Any]) -> 'SitePlan':
    if not isinstance(value, Mapping):
      raise PolicyError(f'SitePlan JSON must be an object. Found {value!r}.')
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if f not in value]
    if missing:
      raise PolicyError(f'SitePlan JSON must have the keys {", ".join(fields)}. '
                        f'Found missing {missing}.')
    plan = cls(**{f: value[f] for f in fields})
    plan.validate()
    return plan

  def validate(self) -> None:
    example_sampling(self.examples, self.expected_batch_size)
    accounting.positive_int('planned_steps', self.planned_steps)
    accounting.positive('l2_norm_clip', self.l2_norm_clip)
    accounting.positive('scale', self.scale)
    if (not isinstance(self.noise_multipliers, Mapping) or
        set(self.noise_multipliers) != set(categories.CATEGORY_IDS)):
      raise PolicyError(f'noise_multipliers must have the six categories. '
                        f'Found {self.noise_multipliers!r}.')
    for c in categories.CATEGORY_IDS:
      accounting.positive(f'noise_multipliers[{c}]', self.noise_multipliers[c])


def data_weighted_scale(noise_multipliers: Mapping[str, float],
                        category_counts: Mapping[str, int]) -> float:
  """s = sum_c n_c z_c / sum_c n_c (the plain mean of the z_c if the site has no example)."""
  total = sum(category_counts.get(c, 0) for c in categories.CATEGORY_IDS)
  if total == 0:
    return float(np.mean([noise_multipliers[c] for c in categories.CATEGORY_IDS]))
  return float(sum(category_counts.get(c, 0) * noise_multipliers[c]
                   for c in categories.CATEGORY_IDS) / total)


def plan_site(policy: PrivacyPolicy,
              category_counts: Union[Mapping[str, int], Sequence[int]],
              expected_batch_size: int,
              planned_steps: int,
              l2_norm_clip: float,
              accountant: Union[accounting.Accountant, str] = accounting.Accountant.RDP
             ) -> SitePlan:
  """Calibrates a site: z_c for (epsilon_c, delta) at q = b / n over `planned_steps` steps.

  Args:
    policy: The per-category budgets.
    category_counts: The site's training examples per category (mapping or 6 counts in order).
    expected_batch_size: b, the expected Poisson batch size.
    planned_steps: Local steps a round x the rounds the site may take part in.
    l2_norm_clip: C.
    accountant: RDP or PLD.
  """
  if not isinstance(policy, PrivacyPolicy):
    raise PolicyError(f'policy must be a PrivacyPolicy. Found {policy!r}.')
  if not isinstance(category_counts, Mapping):
    counts = list(category_counts)
    if len(counts) != NUM_CATEGORIES:
      raise PolicyError(f'category_counts must have {NUM_CATEGORIES} entries. Found {counts!r}.')
    category_counts = dict(zip(categories.CATEGORY_IDS, counts))
  counts = {c: int(category_counts.get(c, 0)) for c in categories.CATEGORY_IDS}
  if any(v < 0 for v in counts.values()):
    raise PolicyError(f'category_counts must be non-negative. Found {counts!r}.')
  sampling = example_sampling(sum(counts.values()), expected_batch_size)
  steps = accounting.positive_int('planned_steps', planned_steps)
  clip = accounting.positive('l2_norm_clip', l2_norm_clip)
  noise = calibration.calibrate_category_noise(policy, sampling, steps, accountant)
  return SitePlan(examples=sampling.total_clients,
                  expected_batch_size=sampling.expected_clients_per_round,
                  planned_steps=steps, l2_norm_clip=clip, noise_multipliers=noise,
                  category_counts=counts, scale=data_weighted_scale(noise, counts))


def step_event(noise_multiplier: float, rate: float, steps: int) -> dp_accounting.DpEvent:
  """What `steps` DP-SGD steps at multiplier z on Poisson batches of rate q are, as a DpEvent."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
      steps)


def applied_settings(plan: SitePlan, released: Sequence[str]) -> tuple[np.ndarray, np.float32]:
  """(C_c per category, s C) in float32, exactly as a step applies them."""
  clip_norms = plan.clip_norms(released)
  return (np.array([clip_norms[c] for c in categories.CATEGORY_IDS], np.float32),
          np.float32(plan.noise_stddev))


def round_events(plan: SitePlan, released: Sequence[str],
                 steps: int) -> dict[str, Optional[dp_accounting.DpEvent]]:
  """What `steps` steps under `plan` spend per category (None: frozen), from the multiplier
  actually applied (float32 s C / C_c), so that a report made before training is exact."""
  clip32, stddev32 = applied_settings(plan, released)
  return {c: (step_event(float(stddev32) / float(clip32[i]), plan.rate, steps)
              if c in released else None) for i, c in enumerate(categories.CATEGORY_IDS)}


@dataclasses.dataclass
class ExampleOutput(ClientOutput):
  """ClientOutput plus what the site's mechanism applied this round.

  sub_updates holds the ONE combined update in the first category slot and zeros in the others:
  the server's plain per-slot mean (ClassAwareFactory.non_private) then averages the sites'
  updates and adds nothing from the empty slots.
  """

  dp_events: dict[str, Optional[dp_accounting.DpEvent]] = dataclasses.field(default_factory=dict)
  steps: int = 0
  batch_sizes: list[int] = dataclasses.field(default_factory=list)


def _clip_factors(norms, labels, clip_by_label):
  """min(1, C_{c(i)} / |g_i|): clip = inf (clipping off) gives 1; clip = 0 (frozen) gives 0."""
  clip = tf.gather(clip_by_label, labels)
  return tf.where(norms > clip, clip / tf.maximum(norms, 1e-30), tf.ones_like(norms))


class DPSGDTrainer:
  """Example-level DP-SGD with per-category clip norms (Scale), compiled once for all sites.

  `train` takes the same (initial_weights, x, y) as LocalTrainer.train plus the site's plan and
  the categories it may still release, and returns one combined update.
  """

  def __init__(self, build_keras_model: Callable[[], tf.keras.Model], learning_rate: float,
               local_steps: int, noise_seed: Optional[int] = None):
    """Builds the trainer.

    Args:
      build_keras_model: The model; no BatchNorm (it mixes examples).
      learning_rate: Client SGD learning rate.
      local_steps: DP-SGD steps per round.
      noise_seed: Seeds the noise (tests only). None draws it from OS entropy: noise that can
        be replayed from a known seed protects nothing.
    """
    self._model = build_keras_model()
    self._variables = self._model.trainable_variables
    self._loss = tf.keras.losses.SparseCategoricalCrossentropy(
        reduction=tf.keras.losses.Reduction.NONE)
    self._learning_rate = accounting.positive('learning_rate', learning_rate)
    self._local_steps = accounting.positive_int('local_steps', local_steps)
    self._generator = (tf.random.Generator.from_non_deterministic_state() if noise_seed is None
                       else tf.random.Generator.from_seed(int(noise_seed)))
    batch_spec = [tf.TensorSpec([None, categories.IMAGE_SIZE, categories.IMAGE_SIZE, 1],
                                tf.float32), tf.TensorSpec([None], tf.int32)]
    scalars = [tf.TensorSpec([NUM_CATEGORIES], tf.float32), tf.TensorSpec([], tf.float32)]
    self._release_fn = tf.function(self._release, input_signature=batch_spec + scalars)
    # Extra records (audit canaries, see `train`): flat gradients and their labels.
    extra_spec = [tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32)]
    self._step_fn = tf.function(
        self._step,
        input_signature=batch_spec + scalars + [tf.TensorSpec([], tf.float32)] * 2 + extra_spec)
    self._sizes = [int(np.prod(v.shape)) for v in self._variables]

  @property
  def keras_model(self) -> tf.keras.Model:
    return self._model

  @property
  def local_steps(self) -> int:
    return self._local_steps

  def _clipped_sum(self, x, y, clip_by_label):
    """sum_i min(1, C_{c(i)} / |g_i|) g_i, and the per-example losses and probabilities."""
    def per_example(args):
      xi, yi = args
      with tf.GradientTape() as tape:
        probabilities = self._model(xi[tf.newaxis], training=True)
        loss = self._loss(yi[tf.newaxis], probabilities)[0]
      gradients = tape.gradient(loss, self._variables,
                                unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return gradients, loss, probabilities[0]

    # One row per example (docs/DESIGN.md says why vectorized_map).
    jacobians, losses, probabilities = tf.vectorized_map(per_example, (x, y))
    batch = tf.shape(y)[0]
    squared = tf.add_n([tf.reduce_sum(tf.reshape(g, [batch, -1])**2, axis=1) for g in jacobians])
    factors = _clip_factors(tf.sqrt(squared), y, clip_by_label)
    summed = [tf.tensordot(factors, g, axes=1) for g in jacobians]
    return summed, losses, probabilities

  def _extra_sum(self, gradients, labels, clip_by_label):
    """Extra records' gradients clipped by the same rule as the batch's, summed per variable."""
    factors = _clip_factors(tf.norm(gradients, axis=1), labels, clip_by_label)
    flat = tf.tensordot(factors, gradients, axes=1)
    return [tf.reshape(part, tf.shape(v)) for part, v in
            zip(tf.split(flat, self._sizes), self._variables)]

  def _release(self, x, y, clip_by_label, noise_stddev):
    """The step's released value: clipped sum plus one N(0, noise_stddev^2) draw (tests)."""
    summed, _, _ = self._clipped_sum(x, y, clip_by_label)
    return [s + noise_stddev * self._generator.normal(tf.shape(s)) for s in summed]

  def _step(self, x, y, clip_by_label, noise_stddev, expected_batch_size, learning_rate,
            extra_gradients, extra_labels):
    if tf.shape(y)[0] > 0:
      summed, losses, probabilities = self._clipped_sum(x, y, clip_by_label)
      predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
      one_hot = tf.one_hot(y, NUM_CATEGORIES)
      loss_sum = tf.linalg.matvec(one_hot, losses, transpose_a=True)
      correct = tf.linalg.matvec(
          one_hot, tf.cast(tf.equal(predicted, y), tf.float32), transpose_a=True)
    else:
      # An empty Poisson batch still releases the noise (the accountant counts the step).
      summed = [tf.zeros_like(v) for v in self._variables]
      loss_sum = tf.zeros([NUM_CATEGORIES])
      correct = tf.zeros([NUM_CATEGORIES])
    extra = self._extra_sum(extra_gradients, extra_labels, clip_by_label)
    for variable, s, e in zip(self._variables, summed, extra):
      noised = s + e + noise_stddev * self._generator.normal(tf.shape(s))
      variable.assign_sub(learning_rate * noised / expected_batch_size)
    return loss_sum, correct

  def _assign(self, weights) -> None:
    for variable, value in zip(self._variables, weights):
      variable.assign(np.asarray(value, np.float32))

  def release(self, weights, x, y, clip_by_label: Sequence[float],
              noise_stddev: float) -> list[np.ndarray]:
    """One step's noised clipped sum at `weights` for the batch (x, y): for tests and audits."""
    self._assign(weights)
    return [v.numpy() for v in self._release_fn(
        tf.constant(x, tf.float32), tf.constant(y, tf.int32),
        tf.constant(clip_by_label, tf.float32), tf.constant(noise_stddev, tf.float32))]

  def step(self, weights, x, y, clip_by_label: Sequence[float], noise_stddev: float,
           expected_batch_size: float) -> list[np.ndarray]:
    """The weights after one DP-SGD step on the batch (x, y) (no sampling: the batch is given)."""
    self._assign(weights)
    self._step_fn(tf.constant(x, tf.float32), tf.constant(y, tf.int32),
                  tf.constant(clip_by_label, tf.float32), tf.constant(noise_stddev, tf.float32),
                  tf.constant(expected_batch_size, tf.float32),
                  tf.constant(self._learning_rate, tf.float32), *self._no_extra())
    return [v.numpy() for v in self._variables]

  def _no_extra(self):
    return tf.zeros([0, sum(self._sizes)], tf.float32), tf.zeros([0], tf.int32)

  def _extra(self, extra_records, step: int):
    if extra_records is None:
      return self._no_extra()
    gradients, labels = extra_records(step)
    gradients = np.asarray(gradients, np.float32).reshape(-1, sum(self._sizes))
    labels = np.asarray(labels, np.int32)
    if len(labels) != len(gradients) or np.any((labels < 0) | (labels >= NUM_CATEGORIES)):
      raise PolicyError(f'extra records need one category label (0 to {NUM_CATEGORIES - 1}) per '
                        f'gradient. Found {len(gradients)} gradients, labels {labels!r}.')
    return tf.constant(gradients), tf.constant(labels)

  def train(self, initial_weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, *,
            plan: SitePlan, released: Sequence[str] = categories.CATEGORY_IDS,
            sampling_seed=0,
            extra_records: Optional[Callable[[int], tuple[np.ndarray, np.ndarray]]] = None
           ) -> ExampleOutput:
    """`local_steps` DP-SGD steps from `initial_weights` on the site's (x, y); one update.

    Args:
      initial_weights: The broadcast trainable weights.
      x: float32 (n, 64, 64, 1) images in [0, 1].
      y: int labels, n of them; n must equal plan.examples.
      plan: The site's calibration.
      released: Categories still within budget at this site; the others' examples get clip 0.
      sampling_seed: Seeds the Poisson batches (a seed sequence, e.g. (secret, round, site)),
        so that a resumed run repeats them; it must be secret (see docs/PRIVACY.md).
      extra_records: For audit runs only (training/example_canaries.py): step index -> (flat
        per-record gradients (k, d), their category labels (k,)), records that join that
        step's batch as given gradients: clipped by their category's C_c and summed with the
        batch's before the step's one noise draw. Not counted as examples or in the metrics;
        the events (what the ledger records) are unchanged.
    """
    y = np.asarray(y)
    if len(y) != plan.examples:
      raise PolicyError(f'the site\'s examples must be what its plan was calibrated for '
                        f'({plan.examples}). Found {len(y)}.')
    unknown = [c for c in released if c not in categories.LABEL_OF]
    if unknown:
      raise PolicyError(f'released must hold category ids. Found {unknown}.')
    # float32, as the step applies them: the event reports the multiplier actually applied.
    clip32, stddev32 = applied_settings(plan, released)
    rng = np.random.default_rng(sampling_seed)
    self._assign(initial_weights)
    constants = (tf.constant(clip32), tf.constant(stddev32),
                 tf.constant(plan.expected_batch_size, tf.float32),
                 tf.constant(self._learning_rate, tf.float32))
    loss_sum = np.zeros(NUM_CATEGORIES)
    correct = np.zeros(NUM_CATEGORIES)
    sampled = np.zeros(NUM_CATEGORIES, np.int64)
    batch_sizes = []
    for step in range(self._local_steps):
      # Poisson sampling: each example independently with probability q = b / n.
      chosen = np.flatnonzero(rng.random(plan.examples) < plan.rate)
      batch_sizes.append(len(chosen))
      losses, hits = self._step_fn(tf.constant(x[chosen], tf.float32),
                                   tf.constant(y[chosen], tf.int32), *constants,
                                   *self._extra(extra_records, step))
      loss_sum += losses.numpy()
      correct += hits.numpy()
      sampled += np.bincount(y[chosen], minlength=NUM_CATEGORIES)
    update = [np.asarray(w, np.float32) - v.numpy()
              for w, v in zip(initial_weights, self._variables)]
    finite = all(np.all(np.isfinite(u)) for u in update)
    if not finite:  # Post-processing of the noised releases: costs no privacy.
      update = [np.zeros_like(u) for u in update]
    zeros = [np.zeros_like(u) for u in update]
    events = round_events(plan, released, self._local_steps)
    return ExampleOutput(
        sub_updates=[update] + [zeros] * (NUM_CATEGORIES - 1),
        num_examples=sampled, loss_sum=loss_sum.astype(np.float32),
        correct=correct.astype(np.int64),
        nonfinite=np.array([0 if finite else 1] + [0] * (NUM_CATEGORIES - 1)),
        dp_events=events, steps=self._local_steps, batch_sizes=batch_sizes)
