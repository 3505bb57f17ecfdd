"""Time of one training round: plain Keras, TFF FedAvg (with and without DP), and ours.

Needs an installed execution context (tff_medical.runtime.install_execution_context). Method:
docs/DESIGN.md.
"""

import dataclasses
import enum
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_medical import categories
from tff_medical.aggregation import class_aware
from tff_medical.data import model_input
from tff_medical.data import phantoms
from tff_medical.models import cnn
from tff_medical.privacy import accounting
from tff_medical.privacy import calibration
from tff_medical.training import cohort
from tff_medical.training import process as process_lib

# The targets, as ratios of median round times.
TARGET_VS_TFF_DP = 1.25
TARGET_VS_KERAS = 1.1


class Contender(enum.Enum):
  KERAS = 'keras'
  KERAS_FIT = 'keras_fit'
  TFF_FEDAVG = 'tff_fedavg'
  TFF_DP = 'tff_dp'
  CLASS_AWARE_DP = 'class_aware_dp'
  CLASS_AWARE = 'class_aware'


DESCRIPTIONS = {
    Contender.KERAS: 'plain Keras, tf.function SGD loop over the union of the examples',
    Contender.KERAS_FIT: 'plain Keras model.fit over the same union',
    Contender.TFF_FEDAVG: 'TFF build_unweighted_fed_avg, default aggregation',
    Contender.TFF_DP: 'TFF build_unweighted_fed_avg + tff.learning.dp_aggregator',
    Contender.CLASS_AWARE_DP: 'ours: CohortTrainer for the cohort + class-aware DP process',
    Contender.CLASS_AWARE: 'ours: CohortTrainer for the cohort + class-aware process, DP off',
}


def check_positive_ints(owner: Any, fields: Iterable[str]) -> None:
  """ValueError naming the first of `owner`'s `fields` that is not a positive int."""
  for field in fields:
    value = getattr(owner, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f'{field} must be a positive integer. Found {value!r}.')


@dataclasses.dataclass(frozen=True)
class Setting:
  """One benchmark setting: who trains what, and how."""

  name: str
  num_clients: int
  examples_per_client: int
  batch_size: int = 32
  local_epochs: int = 1
  client_learning_rate: float = 0.05
  conv_filters: tuple[int, ...] = (16, 32)
  # 0.5, not 1.0: TFF's dp_aggregator keeps its clipped-count stddev at 0.05 x clients per
  # round and refuses a noise multiplier >= twice that, so 1.0 fails at 10 clients. The noise's
  # size does not change the work of a round.
  noise_multiplier: float = 0.5
  # Our splits need a count stddev of ~3.3 z; allow up to all of the clients per round, as the
  # brief's measurement setting does (timing only, not a recommended privacy setting).
  max_count_noise_fraction: float = 1.0
  seed: int = 0

  def __post_init__(self):
    check_positive_ints(self, ('num_clients', 'examples_per_client', 'batch_size',
                               'local_epochs'))
    if not self.noise_multiplier > 0:
      raise ValueError(f'noise_multiplier must be positive. Found {self.noise_multiplier!r}.')

  @property
  def num_examples(self) -> int:
    return self.num_clients * self.examples_per_client

  def to_json_dict(self) -> dict:
    return dict(dataclasses.asdict(self), conv_filters=list(self.conv_filters))


# The facts file's measurement setting, and many small clients (where per-client cost shows).
DEFAULT_SETTINGS = (
    Setting('10 clients x 100 examples', num_clients=10, examples_per_client=100),
    Setting('100 clients x 10 examples', num_clients=100, examples_per_client=10),
)


@dataclasses.dataclass
class ClientArrays:
  images: np.ndarray  # uint8 (n, 64, 64)
  labels: np.ndarray  # int32 (n,)


def make_clients(setting: Setting) -> list[ClientArrays]:
  """Phantoms split into equal, contiguous (the generator shuffles) client shards."""
  per_category = math.ceil(setting.num_examples / categories.NUM_CATEGORIES)
  data = phantoms.generate(per_category, seed=setting.seed)
  n = setting.examples_per_client
  return [ClientArrays(data.images[i * n:(i + 1) * n], data.labels[i * n:(i + 1) * n])
          for i in range(setting.num_clients)]


def _as_float(images: np.ndarray) -> np.ndarray:
  # What the program feeds the trainer: (n, 64, 64, 1) float32 in [0, 1].
  return model_input.to_model_input(images)


def local_steps(contender: Contender, clients: list[ClientArrays], setting: Setting) -> int:
  """SGD steps one round takes: the work differs even though the examples are the same."""
  batches = lambda n: math.ceil(n / setting.batch_size)
  if contender in (Contender.KERAS, Contender.KERAS_FIT):
    steps = batches(sum(len(c.labels) for c in clients))
  elif contender in (Contender.TFF_FEDAVG, Contender.TFF_DP):
    steps = sum(batches(len(c.labels)) for c in clients)
  else:  # Per-category training: one batch loop per category present at each client.
    steps = sum(batches(int(count)) for c in clients
                for count in np.bincount(c.labels, minlength=categories.NUM_CATEGORIES))
  return steps * setting.local_epochs


# A round function runs one round and returns the examples it trained and, where the round has
# distinct phases, their seconds.
RoundFn = Callable[[], tuple[int, dict[str, float]]]


def _union(clients: list[ClientArrays]) -> tuple[np.ndarray, np.ndarray]:
  return (np.concatenate([c.images for c in clients]),
          np.concatenate([c.labels for c in clients]))


def _keras_loop_round(setting: Setting, clients: list[ClientArrays]) -> RoundFn:
  """Minibatch SGD in one compiled graph: no per-step Python, as in LocalTrainer."""
  model = cnn.build_cnn(setting.conv_filters, seed=setting.seed)
  variables = model.trainable_variables
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
  images, labels = _union(clients)
  batch_size, learning_rate = setting.batch_size, setting.client_learning_rate

  @tf.function(input_signature=[
      tf.TensorSpec([None] + list(cnn.INPUT_SHAPE), tf.float32),
      tf.TensorSpec([None], tf.int32)])
  def train(x, y):
    n = tf.shape(y)[0]
    trained = tf.constant(0)
    for _ in range(setting.local_epochs):
      for b in tf.range((n + batch_size - 1) // batch_size):
        xb = x[b * batch_size:(b + 1) * batch_size]
        yb = y[b * batch_size:(b + 1) * batch_size]
        with tf.GradientTape() as tape:
          loss = loss_fn(yb, model(xb, training=True))
        for variable, gradient in zip(variables, tape.gradient(loss, variables)):
          variable.assign_sub(learning_rate * gradient)
        trained += tf.shape(yb)[0]
    return trained

  return lambda: (int(train(_as_float(images), labels)), {})


def _keras_fit_round(setting: Setting, clients: list[ClientArrays]) -> RoundFn:
  model = cnn.build_cnn(setting.conv_filters, seed=setting.seed)
  model.compile(optimizer=tf.keras.optimizers.SGD(setting.client_learning_rate),
                loss=tf.keras.losses.SparseCategoricalCrossentropy())
  images, labels = _union(clients)

  def run_round() -> int:
    history = model.fit(_as_float(images), labels, batch_size=setting.batch_size,
                        epochs=setting.local_epochs, shuffle=False, verbose=0)
    # fit does not report examples; its completed epochs times the data it was given.
    return len(history.epoch) * len(labels), {}

  return run_round


def _tff_round(setting: Setting, clients: list[ClientArrays], dp: bool) -> RoundFn:
  model_fn = process_lib.keras_model_fn(
      lambda: cnn.build_cnn(setting.conv_filters, seed=setting.seed))
  aggregator = (tff.learning.dp_aggregator(noise_multiplier=float(setting.noise_multiplier),
                                           clients_per_round=float(setting.num_clients))
                if dp else None)
  learning_process = tff.learning.algorithms.build_unweighted_fed_avg(
      model_fn,
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(setting.client_learning_rate),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
      model_aggregator=aggregator)
  state = learning_process.initialize()

  def run_round() -> int:
    nonlocal state
    # Built each round, as a TFF data source creates a sampled client's dataset.
    datasets = [tf.data.Dataset.from_tensor_slices((_as_float(c.images), c.labels))
                .batch(setting.batch_size).repeat(setting.local_epochs) for c in clients]
    output = learning_process.next(state, datasets)
    state = output.state
    return int(output.metrics['client_work']['train']['num_examples']), {}

  return run_round


def class_aware_factory(dp: bool, noise_multiplier: float, clients_per_round: float,
                        max_count_noise_fraction: float,
                        clip: Optional[class_aware.AdaptiveClipSettings] = None
                        ) -> class_aware.ClassAwareFactory:
  """Our aggregator with one noise multiplier for every category (timing, not calibration)."""
  if not dp:
    return class_aware.ClassAwareFactory.non_private()
  splits = calibration.category_splits(
      {c: noise_multiplier for c in categories.CATEGORY_IDS}, clients_per_round,
      max_count_noise_fraction=max_count_noise_fraction)
  return class_aware.ClassAwareFactory.dp(splits, clip or class_aware.AdaptiveClipSettings())


def class_aware_round(learning_process, trainer: cohort.CohortTrainer, state,
                      clients: Iterable[tuple[int, np.ndarray, np.ndarray]], seed: int,
                      round_num: int) -> tuple[Any, int, dict[str, float]]:
  """One round as tff_medical.training.program runs it, less its bookkeeping.

  Every category released, `CohortTrainer.train` for the clients, then `process.next`.
  `clients` yields (position in the population, float images, labels); it is consumed inside
  the local-training phase, so a lazy one is timed with the training, as in the program.

  Returns:
    The new state, the examples trained and the seconds of each phase.
  """
  state = state._replace(aggregator=class_aware.with_released_categories(
      state.aggregator, categories.CATEGORY_IDS))
  initial = [np.asarray(w) for w in state.global_model_weights.trainable]
  start = time.perf_counter()
  clients = list(clients)
  outputs = trainer.train(initial, [(x, y) for _, x, y in clients],
                          [(seed, round_num, int(position)) for position, _, _ in clients])
  trained = time.perf_counter()
  output = learning_process.next(
      state, [process_lib.as_sub_update_structs(o.sub_updates) for o in outputs])
  phases = {'local_training': trained - start,
            'tff_aggregation_and_server': time.perf_counter() - trained}
  return output.state, int(sum(int(o.num_examples.sum()) for o in outputs)), phases


def _class_aware_round(setting: Setting, clients: list[ClientArrays], dp: bool) -> RoundFn:
  """tff_medical.training.program's round, less its bookkeeping (see docs/DESIGN.md)."""
  build = lambda: cnn.build_cnn(setting.conv_filters, seed=setting.seed)
  factory = class_aware_factory(dp, setting.noise_multiplier, setting.num_clients,
                                setting.max_count_noise_fraction)
  learning_process = process_lib.build_class_aware_process(
      build, factory, tff.learning.optimizers.build_sgdm(1.0))
  trainer = cohort.CohortTrainer(build, setting.client_learning_rate, setting.batch_size,
                                 setting.local_epochs)
  state = learning_process.initialize()
  round_num = 0

  def run_round() -> int:
    nonlocal state, round_num
    round_num += 1
    state, examples, phases = class_aware_round(
        learning_process, trainer, state,
        ((position, _as_float(c.images), c.labels) for position, c in enumerate(clients)),
        setting.seed, round_num)
    return examples, phases

  return run_round


def build_round(contender: Contender, setting: Setting, clients: list[ClientArrays]) -> RoundFn:
  if contender is Contender.KERAS:
    return _keras_loop_round(setting, clients)
  if contender is Contender.KERAS_FIT:
    return _keras_fit_round(setting, clients)
  if contender in (Contender.TFF_FEDAVG, Contender.TFF_DP):
    return _tff_round(setting, clients, dp=contender is Contender.TFF_DP)
  return _class_aware_round(setting, clients, dp=contender is Contender.CLASS_AWARE_DP)


def _ratio(numerator: float, denominator: float) -> Optional[float]:
  return numerator / denominator if denominator > 0 else None


def run_setting(setting: Setting, timed_rounds: int = 5, warmup_rounds: int = 1,
                contenders: tuple[Contender, ...] = tuple(Contender),
                log: Callable[[str], None] = lambda message: None) -> dict:
  """Times `timed_rounds` rounds of each contender after `warmup_rounds` untimed ones."""
  if timed_rounds < 1 or warmup_rounds < 0:
    raise ValueError(f'timed_rounds must be >= 1 and warmup_rounds >= 0. Found {timed_rounds} '
                     f'and {warmup_rounds}.')
  clients = make_clients(setting)
  rounds, build_seconds, warmup_seconds = {}, {}, {}
  for contender in contenders:
    start = time.perf_counter()
    rounds[contender] = build_round(contender, setting, clients)
    build_seconds[contender] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(warmup_rounds):  # The first round traces and compiles.
      rounds[contender]()
    warmup_seconds[contender] = time.perf_counter() - start
    log(f'{setting.name}: {contender.value} built in {build_seconds[contender]:.1f} s, '
        f'warmed up in {warmup_seconds[contender]:.1f} s')
  seconds = {c: [] for c in contenders}
  examples = {c: [] for c in contenders}
  phases = {c: {} for c in contenders}
  for r in range(timed_rounds):
    for contender in contenders:
      start = time.perf_counter()
      trained, round_phases = rounds[contender]()
      seconds[contender].append(time.perf_counter() - start)
      examples[contender].append(trained)
      for phase, phase_seconds in round_phases.items():
        phases[contender].setdefault(phase, []).append(phase_seconds)
    log(f'{setting.name}: timed round {r + 1}/{timed_rounds}: ' + ', '.join(
        f'{c.value} {seconds[c][-1]:.2f} s' for c in contenders))

  results = {}
  for contender in contenders:
    median = statistics.median(seconds[contender])
    results[contender.value] = {
        'description': DESCRIPTIONS[contender],
        'round_seconds': seconds[contender],
        'median_seconds': median,
        'min_seconds': min(seconds[contender]),
        'max_seconds': max(seconds[contender]),
        'build_seconds': build_seconds[contender],
        'warmup_seconds': warmup_seconds[contender],
        'examples_per_round': examples[contender],
        'examples_per_second': _ratio(statistics.median(examples[contender]), median),
        'local_steps_per_round': local_steps(contender, clients, setting),
        'median_phase_seconds': {phase: statistics.median(values)
                                 for phase, values in phases[contender].items()},
    }
  for name in ('keras', 'tff_dp'):
    if name in results:
      for entry in results.values():
        entry[f'ratio_to_{name}'] = _ratio(entry['median_seconds'],
                                           results[name]['median_seconds'])
  targets = {}
  ours = results.get(Contender.CLASS_AWARE_DP.value)
  if ours is not None and 'ratio_to_tff_dp' in ours:
    targets['class_aware_dp_vs_tff_dp'] = {
        'ratio': ours['ratio_to_tff_dp'], 'target': TARGET_VS_TFF_DP,
        'met': ours['ratio_to_tff_dp'] <= TARGET_VS_TFF_DP}
  if ours is not None and 'ratio_to_keras' in ours:
    targets['class_aware_dp_vs_keras'] = {
        'ratio': ours['ratio_to_keras'], 'target': TARGET_VS_KERAS,
        'met': ours['ratio_to_keras'] <= TARGET_VS_KERAS}
  return {'setting': setting.to_json_dict(), 'num_examples': setting.num_examples,
          'timed_rounds': timed_rounds, 'warmup_rounds': warmup_rounds,
          'contenders': results, 'targets': targets}


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def _memory_gib() -> Optional[float]:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def load_average() -> Optional[tuple[float, float, float]]:
  try:
    return tuple(round(v, 2) for v in os.getloadavg())
  except OSError:
    return None


def machine_info() -> dict:
  """What the figures were measured on."""
  gpus = tf.config.list_physical_devices('GPU')
  return {
      'cpu_model': _cpu_model(),
      'cpu_count': os.cpu_count(),
      'cpus_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'memory_gib': _memory_gib(),
      'python': platform.python_version(),
      'tensorflow': tf.__version__,
      'tensorflow_federated': tff.__version__,
      'gpus': [g.name for g in gpus],
      # TFF's C++ worker is CPU only (TFF issue 4600); only in-process TensorFlow could use one.
      'gpu_used': bool(gpus),
  }


def run_benchmark(settings=DEFAULT_SETTINGS, timed_rounds: int = 5, warmup_rounds: int = 1,
                  contenders: tuple[Contender, ...] = tuple(Contender),
                  log: Callable[[str], None] = lambda message: None) -> dict:
  """Every setting's results, with the machine and the load average at start and end."""
  load_start = load_average()
  started = time.perf_counter()
  results = [run_setting(s, timed_rounds, warmup_rounds, contenders, log) for s in settings]
  return {'machine': machine_info(), 'load_average_start': load_start,
          'load_average_end': load_average(),
          'wall_seconds': time.perf_counter() - started,
          'date_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
          'settings': results}
