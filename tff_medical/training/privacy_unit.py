"""The privacy unit of a run (a client, or an example): its plan, ledger and per-round figures.

The simulation (training/program.py) and the cross-silo coordinator subclass these two with
what differs in how a round is trained; the run record (training/run_record.py) checkpoints
and releases through this one interface.
"""

import abc
import dataclasses
from typing import Any, Optional

from tff_medical import categories
from tff_medical.privacy import ledger as ledger_lib
from tff_medical.training import run_record


def client_dp_settings(config) -> dict[str, Any]:
  """The client-level DP settings of a run's fingerprint."""
  privacy = {'dp': config.dp, 'accountant': config.accountant, 'clip': config.clip.to_dict()}
  if run_record.dp_mechanism(config) != 'per_category_noise':
    # Only when not the default, so that runs saved before the option still resume.
    privacy['dp_mechanism'] = run_record.dp_mechanism(config)
  return privacy


class PrivacyUnit(abc.ABC):
  """What a run's record needs of its privacy unit."""

  name: str  # 'client' or 'example': config.json and the model card say which.
  ledger: Any = None  # None without DP.

  @abc.abstractmethod
  def fingerprint_privacy(self) -> dict[str, Any]:
    """The privacy settings a resumed run must share with the run it continues."""

  plan: run_record.Plan

  def plan_json(self) -> str:
    """The calibration as checkpointed (kept on resume even if total_rounds changed)."""
    return self.plan.to_json()

  def plan_record(self) -> dict[str, Any]:
    """The calibration as config.json shows it."""
    return dataclasses.asdict(self.plan)

  def restore_plan(self, restored) -> None:
    """Keeps the calibration the run started with (total_rounds may have changed since)."""
    saved_plan = run_record.from_checkpoint(restored['plan'])
    if saved_plan != run_record.from_checkpoint(self.plan.to_json()):
      self.plan = run_record.Plan(**saved_plan)
      self.plan_restored()

  def plan_restored(self) -> None:
    """Rebuilds what was made from the plan (the aggregator); nothing by default."""

  def ledger_state(self) -> Any:
    return None if self.ledger is None else self.ledger.state()

  @abc.abstractmethod
  def restore(self, restored) -> None:
    """Takes the plan and ledger of a restored checkpoint.

    Raises:
      PolicyError: the checkpoint's ledger is unusable with this policy.
    """

  def releasable(self) -> tuple[str, ...]:
    """Categories the next round may release; empty when the budget is spent."""
    return self.ledger.releasable() if self.ledger is not None else categories.CATEGORY_IDS

  @abc.abstractmethod
  def round_outputs(self, released) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, audit fields) of a committed round."""


class ClientLevel(PrivacyUnit):
  """Class-aware DP-FedAvg: one noise multiplier and adaptive-clip split per category."""

  name = 'client'

  def __init__(self, config, policy, sampling_spec,
               earlier: Optional[ledger_lib.EarlierRuns] = None):
    self._config, self._policy, self._spec, self._earlier = config, policy, sampling_spec, earlier
    self.plan = run_record.calibrate(config, policy, sampling_spec, earlier)
    self.ledger = self._new_ledger() if config.dp else None

  def _new_ledger(self, state=None) -> ledger_lib.PrivacyLedger:
    mechanism = run_record.dp_mechanism(self._config)
    if state is not None:
      return ledger_lib.PrivacyLedger.from_state(
          state, self._policy, sampling=self._spec, accountant=self._config.accountant,
          noise_mechanism=mechanism, earlier=self._earlier)
    return ledger_lib.PrivacyLedger(
        self._policy, self.plan.noise_multipliers, self._spec, self._config.accountant,
        mechanism, run_record.whole_client_noise_multipliers(self.plan), self._earlier)

  def fingerprint_privacy(self) -> dict[str, Any]:
    return client_dp_settings(self._config)

  def restore(self, restored) -> None:
    self.restore_plan(restored)
    if self.ledger is not None:
      self.ledger = self._new_ledger(run_record.from_checkpoint(restored['ledger']))

  @abc.abstractmethod
  def clip_norms(self) -> dict[str, float]:
    """Each category's current adaptive clip norm."""

  def round_outputs(self, released) -> tuple[dict[str, Any], dict[str, Any]]:
    if self.ledger is None:
      return {}, {}
    return run_record.client_level_outputs(self.ledger, self.clip_norms(), released)


class ExampleLevel(PrivacyUnit):
  """DP-SGD at each site with per-category multipliers; `ledger` an example_level.LedgerView."""

  name = 'example'

  def round_outputs(self, released) -> tuple[dict[str, Any], dict[str, Any]]:
    return run_record.example_level_outputs(self.ledger, released)
