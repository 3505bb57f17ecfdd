"""Privacy-utility study: accuracy per category against the policy scale, IID and non-IID.

The embedded phantoms at MedNIST size, split into tens of thousands of clients (IID, and
non-IID by a Dirichlet over categories), trained by the surrogate of class-aware DP-FedAvg
(tff_medical.benchmarks.surrogate: the same mechanism and calibration without TFF's per-round
overhead, which a grid of 24 runs could not afford on 2 cores) with the seed policy, the whole
policy scaled, and without DP; scored on the partition's test split, never trained on.

The demo's settings (configs/demo.py: model, client and server optimizers, clipping) except for
the clip target, which follows the images a client holds (surrogate.target_for_clients; the same
for both partitions, as a user who knows only the mean would set it).
"""

import dataclasses
import time
from typing import Callable, Optional

import numpy as np

from tff_medical import categories
from tff_medical.benchmarks import surrogate
from tff_medical.data import partition as partition_lib
from tff_medical.data import phantoms

NO_DP = None  # The policy "scale" of the non-private runs.


@dataclasses.dataclass(frozen=True)
class StudyPlan:
  num_per_category: int
  num_clients: int
  partitions: tuple[str, ...]
  policy_scales: tuple[Optional[float], ...]  # NO_DP: without clipping or noise.
  seeds: tuple[int, ...]
  clients_per_round: int
  rounds: int
  dirichlet_alpha: float = 0.5
  test_fraction: float = 0.1
  eval_every: int = 50


# 9,826 a category: 58,956 images, MedNIST's 58,954 rounded to a multiple of six.
FULL_PLAN = StudyPlan(num_per_category=9826, num_clients=20000, partitions=('iid', 'dirichlet'),
                      policy_scales=(0.25, 0.5, 1.0, 2.0, 4.0, NO_DP), seeds=(0, 1),
                      clients_per_round=200, rounds=100)
QUICK_PLAN = StudyPlan(num_per_category=300, num_clients=600, partitions=('iid', 'dirichlet'),
                       policy_scales=(1.0, NO_DP), seeds=(0,), clients_per_round=100, rounds=10,
                       eval_every=10)


def scale_key(scale: Optional[float]) -> str:
  return 'no_dp' if scale is NO_DP else f'x{scale:g}'


def run_study(plan: StudyPlan, log: Callable[[str], None] = print) -> dict:
  """Every (partition, policy scale, seed) of the plan; accuracies and their spread."""
  started = time.perf_counter()
  images = phantoms.generate(plan.num_per_category, seed=0)
  x, y = surrogate.as_inputs(images)
  log(f'privacy-utility: {len(y)} phantoms in {time.perf_counter() - started:.0f} s')
  results = {'plan': dataclasses.asdict(plan), 'partitions': {}}
  for scheme in plan.partitions:
    split = partition_lib.partition(images.labels, plan.num_clients, scheme,
                                    alpha=plan.dirichlet_alpha, seed=0,
                                    test_fraction=plan.test_fraction, holdout_fraction=0.0)
    index, offsets = split.csr('train')
    test = split.test_indices
    x_test, y_test = x[test], y[test]
    counts = split.category_count_matrix('train')
    images_per_client = len(index) / plan.num_clients
    target = surrogate.target_for_clients(images_per_client)
    runs = {}
    for scale in plan.policy_scales:
      for seed in plan.seeds:
        settings = surrogate.Settings(
            clients_per_round=plan.clients_per_round, rounds=plan.rounds,
            target_unclipped_quantile=target, dp=scale is not NO_DP,
            policy_scale=1.0 if scale is NO_DP else scale)
        run_started = time.perf_counter()
        outcome = surrogate.train(x, y, index, offsets, x_test, y_test, settings, seed,
                                  eval_every=plan.eval_every)
        outcome['seconds'] = time.perf_counter() - run_started
        runs.setdefault(scale_key(scale), []).append(dict(outcome, seed=seed))
        log(f'privacy-utility {scheme} {scale_key(scale)} seed {seed}: '
            f'{outcome["accuracy"]:.3f} ({outcome["seconds"]:.0f} s)')
    results['partitions'][scheme] = {
        'clients': plan.num_clients, 'train_examples': int(len(index)),
        'test_examples': int(len(test)), 'images_per_client': images_per_client,
        # How non-IID: the mean number of categories a client holds, and the largest group
        # (images of one category at one client; one local step covers up to batch size 16).
        'mean_categories_held': float(np.mean(np.count_nonzero(counts, axis=1))),
        'largest_category_group': int(counts.max()),
        'clip_target': target, 'runs': runs, 'summary': _summary(runs)}
  results['seconds'] = time.perf_counter() - started
  return results


def _summary(runs: dict) -> dict:
  """Per policy scale: mean, min and max over seeds, overall and per category."""
  summary = {}
  for key, outcomes in runs.items():
    summary[key] = {'all': surrogate.mean_min_max([o['accuracy'] for o in outcomes])}
    for c in categories.CATEGORY_IDS:
      summary[key][c] = surrogate.mean_min_max([o['per_category'][c] for o in outcomes])
  return summary


def gaps_to_non_private(summary: dict, policy: str = 'x1') -> dict[str, float]:
  """Mean accuracy of each category at `policy` (a scale_key) minus without DP, in points."""
  return {c: 100 * (summary[policy][c]['mean'] - summary['no_dp'][c]['mean'])
          for c in categories.CATEGORY_IDS}
