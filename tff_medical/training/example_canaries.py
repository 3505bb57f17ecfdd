"""Canary examples of the empirical privacy audit at example level (privacy_unit 'example').

At one site (config.audit.example_site; default the partition's first), per category c, canary
records whose per-example gradient is a fixed random unit direction scaled to
audit.canary_norm_multiple x C_c (so the step clips it to C_c). Each joins each DP-SGD step's
batch with the site's Poisson rate q, drawn from a secret (as the site's batches are): extra
records of the same clipped sum before the step's one noise draw (DPSGDTrainer's
extra_records); the accounting and the ledger are the mechanism's own, untouched.

The statistic is CanaryAudit's (training/canaries.py): each canary's cosine with what the site
releases, its per-round update (the only thing that leaves the site; max over the rounds it took
part in) and the sum of those updates, against never-inserted canaries; plus the same on the
global model's deltas. The claim is the site's per-category example-level epsilon from the
example ledger. Method: docs/PRIVACY_AUDIT.md.
"""

import json
import os
from typing import Any, Optional

import numpy as np

from tff_medical import categories
from tff_medical import fileio
from tff_medical import run_files
from tff_medical.errors import ConfigError
from tff_medical.training import canaries


class SiteClaims:
  """The example ledger's epsilons of one site, read as audit_report reads a run's ledger."""

  def __init__(self, ledger, site_id: str):
    self._ledger = ledger
    self._site_id = site_id

  def epsilon_this_run(self, category_id: str) -> float:
    return float(self._ledger.example.site_epsilon(self._site_id, category_id))


class SiteAudit(canaries.ProgramAudit):
  """What the training program calls in an example-level audit run (see program.py)."""

  def __init__(self, config, run_dir: str, sampler, initial_trainable, round_num: int, *,
               site_id: str, rate: float, local_steps: int):
    # CanaryAudit's Poisson draws at the site's q (one draw per step, keyed by the step's
    # index in the run), from the sampler's secret like the client-level canaries.
    self._config = config
    self._run_dir = run_dir
    self.site_id = site_id
    self._local_steps = int(local_steps)
    self.canaries = canaries.CanaryAudit.for_run(config, run_dir, initial_trainable,
                                                 sampler.seed, rate, round_num)
    self._sampled: dict[str, np.ndarray] = {}
    self._site_update = None
    self._site_released: tuple[str, ...] = ()

  @classmethod
  def for_run(cls, config, run_dir: str, sampler, initial_trainable, round_num: int,
              client_ids, plans) -> Optional['SiteAudit']:
    """The run's site audit, or None when config.audit is off."""
    if not canaries.enabled(config):
      return None
    site_id = config.audit.get('example_site', '') or client_ids[0]
    if site_id not in plans:
      raise ConfigError(f'audit.example_site must be one of the run\'s sites (e.g. '
                        f'{client_ids[0]!r}). Found {site_id!r}.')
    return cls(config, run_dir, sampler, [np.asarray(w) for w in initial_trainable], round_num,
               site_id=site_id, rate=plans[site_id].rate,
               local_steps=config.example_dp.local_steps)

  def extra_records(self, round_num: int, plan, released):
    """DPSGDTrainer's extra_records for the site's round: step -> (gradients, labels)."""
    self._sampled = {c: [] for c in categories.CATEGORY_IDS}
    clip_norms = plan.clip_norms()  # Planned C_c; a frozen category's canary is clipped to 0.
    del released

    def records(step: int):
      key = (int(round_num) - 1) * self._local_steps + int(step) + 1
      sampled = self.canaries.sampled(key)
      gradients, labels = [], []
      for c in categories.CATEGORY_IDS:
        self._sampled[c].extend(int(k) for k in sampled[c])
        gradients.append(self.canaries.vectors(c, sampled[c], clip_norms[c]))
        labels.append(np.full(len(sampled[c]), categories.LABEL_OF[c], np.int32))
      return np.concatenate(gradients), np.concatenate(labels)

    return records

  def site_trained(self, output, released) -> None:
    """The site's round output (its release) and the categories it could still release."""
    self._site_update = output.sub_updates[0]
    self._site_released = tuple(released)

  def client_inputs(self, round_num: int, aggregator_state) -> list:
    del round_num, aggregator_state
    return []  # No canary clients at example level: the canaries are inside the site.

  def record(self, round_num: int, released, metrics, before_trainable, after_trainable) -> None:
    """The round's site release (if the site took part) and the global model's delta."""
    del released, metrics
    delta = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
             for a, b in zip(after_trainable, before_trainable)]
    took_part = self._site_update is not None
    self.canaries.record_round(
        round_num, self._site_released if took_part else (),
        {c: np.asarray(v, np.int64) for c, v in self._sampled.items()},
        {c: self._site_update for c in categories.CATEGORY_IDS}, delta)
    self._sampled, self._site_update, self._site_released = {}, None, ()

  def finish(self, final_trainable, ledger, policy) -> dict[str, Any]:
    """Writes empirical_audit.json: the site's claims against its canaries (no site id)."""
    report = canaries.audit_report(self.canaries, [np.asarray(w) for w in final_trainable],
                                   SiteClaims(ledger, self.site_id), policy,
                                   confidence=self._config.audit.confidence,
                                   bootstrap=self._config.audit.bootstrap)
    report.update(privacy_unit='example', method=report['method'] + ', canary examples at one '
                  'site (claim: that site\'s example-level epsilon)')
    fileio.write_atomic(os.path.join(self._run_dir, run_files.EMPIRICAL_AUDIT_FILE),
                        json.dumps(report, indent=2, allow_nan=False) + '\n')
    return report
