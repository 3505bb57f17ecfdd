"""Scaling of our class-aware DP round: round time and peak memory against the population.

One point: python -m tff_medical.benchmarks.scaling POINT.json RESULT.json. Method: docs/DESIGN.md.
"""

import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np

from tff_medical import categories
from tff_medical.benchmarks import round_time
from tff_medical.data import model_input

IMAGES_FILE = 'images.npy'
LABELS_FILE = 'labels.npy'


@dataclasses.dataclass(frozen=True)
class ScalingPoint:
  """One measurement: N one-image clients, m (expected) sampled a round."""

  total_clients: int
  clients_per_round: int
  timed_rounds: int = 3
  warmup_rounds: int = 1
  noise_multiplier: float = 1.0
  # Our splits need a count stddev of ~3.3 z, above the program's bound at 10 clients a round:
  # allow up to all of them (timing only, as round_time does).
  max_count_noise_fraction: float = 1.0

  def __post_init__(self):
    round_time.check_positive_ints(self, ('total_clients', 'clients_per_round', 'timed_rounds'))
    if isinstance(self.warmup_rounds, bool) or not isinstance(
        self.warmup_rounds, int) or self.warmup_rounds < 0:
      raise ValueError(f'warmup_rounds must be a non-negative integer. '
                       f'Found {self.warmup_rounds!r}.')
    if self.clients_per_round > self.total_clients:
      raise ValueError(f'clients_per_round must be at most total_clients ({self.total_clients}).'
                       f' Found {self.clients_per_round}.')
    if not self.noise_multiplier > 0:
      raise ValueError(f'noise_multiplier must be positive. Found {self.noise_multiplier!r}.')

  @property
  def key(self) -> str:
    return f'N={self.total_clients},m={self.clients_per_round}'

  def to_json_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ScalingPlan:
  """The two curves: m varied at `fixed_total`, N varied at `fixed_clients_per_round`."""

  fixed_total: int
  clients_per_round: tuple[int, ...]
  fixed_clients_per_round: int
  totals: tuple[int, ...]
  timed_rounds: int
  warmup_rounds: int = 1

  def points(self) -> list[ScalingPoint]:
    """Every point once (the curves share one), in ascending cost."""
    pairs = {(self.fixed_total, m) for m in self.clients_per_round}
    pairs |= {(n, self.fixed_clients_per_round) for n in self.totals}
    return [ScalingPoint(n, m, self.timed_rounds, self.warmup_rounds)
            for n, m in sorted(pairs, key=lambda p: (p[1], p[0]))]

  @property
  def max_total(self) -> int:
    return max((self.fixed_total,) + tuple(self.totals))

  def to_json_dict(self) -> dict:
    return dict(dataclasses.asdict(self), clients_per_round=list(self.clients_per_round),
                totals=list(self.totals))


# CI-sized: a few minutes on 2 cores. Full: up to the MedNIST size and 1000 clients a round.
# The total-clients curve samples 100 a round: at 10, Poisson's spread of the sample size (about
# +-30%) would hide a change with N. A timed round is cheap beside a point's start (imports,
# build, the first round's compilation), so a few of them cost little.
QUICK_PLAN = ScalingPlan(fixed_total=1000, clients_per_round=(10, 100),
                         fixed_clients_per_round=100, totals=(1000, 8100), timed_rounds=3)
FULL_PLAN = ScalingPlan(fixed_total=8100, clients_per_round=(10, 100, 1000),
                        fixed_clients_per_round=100, totals=(1000, 8100, 59000), timed_rounds=4)


def make_image_cache(num_images: int, config, directory: str) -> dict:
  """Generates `num_images` phantoms (config's seed and difficulty) into `directory`."""
  # pylint: disable=g-import-not-at-top
  from tff_medical.data import phantoms
  # pylint: enable=g-import-not-at-top
  start = time.perf_counter()
  data = phantoms.generate(math.ceil(num_images / categories.NUM_CATEGORIES), seed=config.seed,
                           difficulty=config.get('phantom_difficulty',
                                                 phantoms.DEFAULT_DIFFICULTY))
  seconds = time.perf_counter() - start
  os.makedirs(directory, exist_ok=True)
  np.save(os.path.join(directory, IMAGES_FILE), data.images)
  np.save(os.path.join(directory, LABELS_FILE), data.labels)
  return {'directory': directory, 'num_images': int(data.labels.shape[0]),
          'generate_seconds': seconds}


def _read_prefix(path: str, count: int) -> np.ndarray:
  """The first `count` rows of a .npy file, read straight into one array (no second copy)."""
  with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(f)
    if fortran_order or shape[0] < count:
      raise ValueError(f'{path} must hold at least {count} rows in C order. Found {shape}.')
    row = int(np.prod(shape[1:], dtype=np.int64))
    return np.fromfile(f, dtype=dtype, count=count * row).reshape((count,) + tuple(shape[1:]))


def _load_images(directory: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  return (_read_prefix(os.path.join(directory, IMAGES_FILE), count),
          _read_prefix(os.path.join(directory, LABELS_FILE), count))


def _status_kib(pid: Any, field: str) -> Optional[int]:
  """A 'VmRSS'/'VmHWM' line of /proc/PID/status in KiB; None where there is no /proc."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _mib(kib: Optional[int]) -> Optional[float]:
  return None if kib is None else kib / 1024


def _peak_rss_mib() -> float:
  """This process's peak RSS: VmHWM, which starts afresh at exec.

  Not getrusage's ru_maxrss where /proc has VmHWM: Linux carries ru_maxrss across fork and
  exec, so a point started from a large benchmark process would report that process's size.
  """
  peak = _status_kib('self', 'VmHWM')
  if peak is not None:
    return peak / 1024
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == 'darwin' else peak / 1024  # Bytes on macOS.


def measure_point(point: ScalingPoint, config, image_dir: str,
                  log: Callable[[str], None] = lambda message: None) -> dict:
  """Setup and round times and memory of one point, in this process (a TFF context installed).

  `config` is a training config (configs/demo.py): its model, client, server, clip, partition,
  sampling and seed are used; its dataset size, clients and clients per round are the point's.
  """
  # pylint: disable=g-import-not-at-top
  from tff_medical.aggregation import class_aware
  from tff_medical.data import partition as partition_lib
  from tff_medical.privacy import sampling as sampling_lib
  from tff_medical.runtime import worker as worker_lib
  from tff_medical.training import cohort
  from tff_medical.training import process as process_lib
  from tff_medical.training import program
  # pylint: enable=g-import-not-at-top
  n, m = point.total_clients, point.clients_per_round
  rss_start = _status_kib('self', 'VmRSS')
  setup = {}
  start = time.perf_counter()
  images, labels = _load_images(image_dir, n)
  setup['data_load'] = time.perf_counter() - start
  start = time.perf_counter()
  partition = partition_lib.partition(labels, n, config.partition, alpha=config.dirichlet_alpha,
                                      seed=config.seed, test_fraction=0.0, holdout_fraction=0.0)
  sampler = sampling_lib.make_sampler(
      sampling_lib.SamplingSpec(config.sampling, partition.num_clients, m), config.seed)
  setup['partition_and_sampler'] = time.perf_counter() - start
  start = time.perf_counter()
  build = lambda: program.build_keras_model(config)
  clip = class_aware.AdaptiveClipSettings(config.clip.initial_l2_norm_clip,
                                          config.clip.target_unclipped_quantile,
                                          config.clip.learning_rate)
  factory = round_time.class_aware_factory(True, point.noise_multiplier, m,
                                           point.max_count_noise_fraction, clip)
  learning_process = process_lib.build_class_aware_process(build, factory,
                                                           program.server_optimizer(config))
  trainer = cohort.CohortTrainer(build, config.client.learning_rate,
                                 config.client.batch_size, config.client.local_epochs)
  state = learning_process.initialize()
  setup['build_process'] = time.perf_counter() - start
  rss_setup = _status_kib('self', 'VmRSS')
  log(f'{point.key}: setup ' + ', '.join(f'{k} {v:.1f} s' for k, v in setup.items()))

  def clients(sampled):
    for position in sampled:
      indices = partition.train_indices(partition.client_ids[position])
      yield (position, model_input.to_model_input(images[indices]),
             labels[indices])

  rounds = []
  for round_num in range(1, point.warmup_rounds + point.timed_rounds + 1):
    start = time.perf_counter()
    sampled = sampler.sample(round_num)
    sampling_seconds = time.perf_counter() - start
    state, examples, phases = round_time.class_aware_round(
        learning_process, trainer, state, clients(sampled), config.seed, round_num)
    seconds = time.perf_counter() - start
    rounds.append({'seconds': seconds, 'clients': int(len(sampled)), 'examples': examples,
                   'phases': dict(sampling=sampling_seconds, **phases)})
    kind = 'warm-up' if round_num <= point.warmup_rounds else 'timed'
    log(f'{point.key}: round {round_num} ({kind}): {seconds:.2f} s, {len(sampled)} clients ('
        + ', '.join(f'{k.replace("_", " ")} {v:.2f} s' for k, v in rounds[-1]['phases'].items())
        + ')')
  timed = rounds[point.warmup_rounds:]
  median = statistics.median(r['seconds'] for r in timed)
  worker = worker_lib.current_worker()
  return {
      'point': point.to_json_dict(),
      'model_parameters': int(sum(np.prod(v.shape)
                                  for v in trainer.keras_model.trainable_variables)),
      'setup_seconds': setup,
      'warmup_seconds': [r['seconds'] for r in rounds[:point.warmup_rounds]],
      'rounds': timed,
      'median_round_seconds': median,
      'median_phase_seconds': {phase: statistics.median(r['phases'][phase] for r in timed)
                               for phase in timed[0]['phases']},
      'mean_clients_per_round': statistics.mean(r['clients'] for r in timed),
      'mean_examples_per_round': statistics.mean(r['examples'] for r in timed),
      'seconds_per_1000_examples': (1000 * sum(r['seconds'] for r in timed) /
                                    max(1, sum(r['examples'] for r in timed))),
      'memory_mib': {
          'rss_at_start': _mib(rss_start),
          'rss_after_setup': _mib(rss_setup),
          'python_peak': _peak_rss_mib(),
          'tff_worker_peak': _mib(_status_kib(worker.pid, 'VmHWM')) if worker else None,
      },
  }


def run_point_subprocess(point: ScalingPoint, config, image_dir: str,
                         timeout_seconds: Optional[float] = None) -> dict:
  """`measure_point` in a fresh Python process; its output passes through to this one's."""
  with tempfile.TemporaryDirectory() as scratch:
    request, result = os.path.join(scratch, 'point.json'), os.path.join(scratch, 'result.json')
    with open(request, 'w') as f:
      json.dump({'point': point.to_json_dict(), 'config': json.loads(config.to_json_best_effort()),
                 'image_dir': image_dir}, f)
    subprocess.run([sys.executable, '-m', 'tff_medical.benchmarks.scaling', request, result],
                   check=True, timeout=timeout_seconds)
    with open(result) as f:
      return json.load(f)


def _curve(results: dict[str, dict], points: list[ScalingPoint], field: str) -> dict:
  return {'points': [p.key for p in points],
          'x': [getattr(p, field) for p in points],
          'median_round_seconds': [results[p.key]['median_round_seconds'] for p in points]}


def run_scaling(plan: ScalingPlan, config, log: Callable[[str], None] = lambda message: None,
                cache_dir: Optional[str] = None) -> dict:
  """Every point of `plan` in its own process; images generated once, in `cache_dir`."""
  started = time.perf_counter()
  load_start = round_time.load_average()
  with tempfile.TemporaryDirectory() as scratch:
    image_dir = cache_dir or os.path.join(scratch, 'images')
    cache = make_image_cache(plan.max_total, config, image_dir)
    log(f'scaling: {cache["num_images"]} phantoms generated in {cache["generate_seconds"]:.1f} s')
    results = {}
    for point in plan.points():
      point_start = time.perf_counter()
      load = round_time.load_average()
      result = run_point_subprocess(point, config, image_dir)
      result['process_seconds'] = time.perf_counter() - point_start
      result['load_average_start'], result['load_average_end'] = load, round_time.load_average()
      results[point.key] = result
  by_m = sorted((p for p in plan.points() if p.total_clients == plan.fixed_total),
                key=lambda p: p.clients_per_round)
  by_n = sorted((p for p in plan.points() if p.clients_per_round == plan.fixed_clients_per_round),
                key=lambda p: p.total_clients)
  return {
      'plan': plan.to_json_dict(),
      'config': {'model': config.model.to_dict(), 'client': config.client.to_dict(),
                 'server': config.server.to_dict(), 'sampling': config.sampling,
                 'partition': config.partition, 'seed': config.seed},
      'image_cache': {'num_images': cache['num_images'],
                      'generate_seconds': cache['generate_seconds']},
      'points': results,
      'by_clients_per_round': _curve(results, by_m, 'clients_per_round'),
      'by_total_clients': _curve(results, by_n, 'total_clients'),
      'load_average_start': load_start,
      'load_average_end': round_time.load_average(),
      'wall_seconds': time.perf_counter() - started,
  }


def _main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise SystemExit('usage: python -m tff_medical.benchmarks.scaling POINT.json RESULT.json')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # pylint: disable=g-import-not-at-top
  from absl import logging
  import tensorflow  # pylint: disable=unused-import
  from tff_medical import runtime
  from tff_medical.training import program
  # pylint: enable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  with open(argv[1]) as f:
    request = json.load(f)
  try:
    runtime.install_execution_context()
    result = measure_point(ScalingPoint(**request['point']),
                           program.config_from_json_dict(request['config']),
                           request['image_dir'], log=lambda message: print(message, flush=True))
  finally:
    runtime.shutdown()
  with open(argv[2], 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  _main(sys.argv)
