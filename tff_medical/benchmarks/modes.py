"""The benchmark's modes: what experiments/bench.py --mode=quick and --mode=full measure."""

import dataclasses
import enum

from tff_medical.benchmarks import privacy_utility
from tff_medical.benchmarks import scaling


class Mode(enum.Enum):
  QUICK = 'quick'  # CI-sized: a few minutes on 2 cores.
  # The study: the scaling curve and the privacy-utility grid at the MedNIST size.
  FULL = 'full'


@dataclasses.dataclass(frozen=True)
class ModeSpec:
  comparison_timed_rounds: int  # Timed rounds per contender of the round comparison.
  scaling_plan: scaling.ScalingPlan
  study_plan: privacy_utility.StudyPlan
  overhead_rounds: int  # Timed rounds of the demo-shaped per-round overhead measurement.


MODES = {
    Mode.QUICK: ModeSpec(2, scaling.QUICK_PLAN, privacy_utility.QUICK_PLAN, 6),
    Mode.FULL: ModeSpec(5, scaling.FULL_PLAN, privacy_utility.FULL_PLAN, 20),
}
