"""The per-round overhead benchmark: the commit steps it times and the section it writes."""

import pytest

from tff_medical.benchmarks import overhead
from tff_medical.benchmarks import report

from helpers import smoke_config  # pylint: disable=g-bad-import-order


def _figures(round_seconds, steps):
  total = sum(steps.values())
  return {'clients_per_round': 200, 'rounds': 6, 'round_seconds_median': round_seconds,
          'round_seconds': [round_seconds] * 6, 'step_seconds': steps,
          'overhead_seconds': total, 'overhead_fraction': total / round_seconds,
          'wall_seconds': 9.0}


def test_the_section_shows_each_step_as_a_share_of_the_round():
  steps = {'checkpoint': 0.02, 'spend': 0.01, 'publish': 0.03, 'on_round': 0.04}
  lines = '\n'.join(overhead.render(_figures(1.0, steps), 'configs/demo.py'))
  assert '| round (median) | 1.000 | 100% |' in lines
  assert f'| {overhead.STEP_NAMES["checkpoint"]} | 0.020 | 2.0% |' in lines
  assert '| **overhead in all** | **0.100** | **10.0%** |' in lines
  assert 'Target: at most 10% of the round: met.' in lines
  lines = '\n'.join(overhead.render(_figures(0.5, steps), 'configs/demo.py'))
  assert '**20.0%**' in lines and 'not met' in lines
  assert overhead.render(None, 'configs/demo.py') == []


def test_the_page_says_plainly_when_no_gpu_was_measured():
  assert 'Unmeasured: no GPU was available' in '\n'.join(report._gpu(  # pylint: disable=protected-access
      {'machine': {'gpus': []}}))
  assert report._gpu({'machine': {'gpus': ['/physical_device:GPU:0']}}) == []  # pylint: disable=protected-access


@pytest.mark.slow
def test_a_tiny_run_times_every_commit_step(tff_context):
  del tff_context
  figures = overhead.run_overhead(smoke_config(), rounds=2, log=lambda _: None,
                                  warmup_rounds=1)
  assert figures['rounds'] == 2 and len(figures['round_seconds']) == 2
  assert set(figures['step_seconds']) == set(overhead.STEPS)
  assert all(v > 0 for v in figures['step_seconds'].values()), figures['step_seconds']
  assert figures['overhead_seconds'] == pytest.approx(sum(figures['step_seconds'].values()))
  assert figures['overhead_fraction'] == pytest.approx(
      figures['overhead_seconds'] / figures['round_seconds_median'])


def test_the_live_page_takes_at_most_its_share_of_the_time(tmp_path, monkeypatch):
  from tff_medical.training import entry  # pylint: disable=g-import-not-at-top
  now = [0.0]
  built = []

  def build(run_dirs, path, live):
    del run_dirs, path
    built.append((now[0], live))
    now[0] += 0.5  # Each rebuild takes half a second.

  monkeypatch.setattr(entry.dashboard, 'build_dashboard', build)
  page = entry.LivePage(str(tmp_path), share=0.05, clock=lambda: now[0])
  for _ in range(40):  # Forty one-second rounds.
    page.refresh(live=True)
    now[0] += 1.0
  page.refresh(live=False)
  live_builds = [t for t, live in built if live]
  # After a 0.5 s rebuild (ending at 0.5 s), the next waits 10 s: at 10.5 s, then 21 s.
  assert live_builds[:3] == [0.0, 10.5, 21.0]
  assert 0.5 * len(live_builds) <= 0.05 * now[0] + 0.5
  assert built[-1][1] is False  # The final page is always written.
