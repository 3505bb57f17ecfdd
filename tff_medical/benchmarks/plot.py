"""The scaling curves as an SVG, written by hand: matplotlib is not in requirements/lock.txt.

Two columns (against clients per round, against total clients), two rows (median round time on
a log scale, peak resident memory on a linear one); log x axes, one marker per measured point,
the legend under each chart.
"""

import math
from typing import Optional, Sequence
from xml.sax import saxutils

_PANEL_W, _PANEL_H = 380, 240
_MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 64, 16, 34, 62
_COLORS = ('#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#111111')
_LEGEND_ROW = 14  # Height of each further legend row.
_CHAR_W = 6.2  # Width of a legend character at font-size 11 (sans-serif, measured by eye).


def _decades(low: float, high: float) -> list[float]:
  """Ticks 1, 2, 5 x 10^k that fall within [low, high] (at least the two ends' decades)."""
  ticks = []
  for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
    for mantissa in (1, 2, 5):
      value = mantissa * 10**k
      if low <= value <= high:
        ticks.append(value)
  return ticks or [low, high]


def _linear_ticks(low: float, high: float) -> list[float]:
  """Round ticks (1, 2 or 5 x 10^k apart), four to six of them across [low, high]."""
  raw = (high - low) / 5
  magnitude = 10**math.floor(math.log10(max(raw, 1e-9)))
  step = next(f * magnitude for f in (1, 2, 5, 10) if f * magnitude >= raw)
  start = math.ceil(low / step) * step
  return [start + i * step for i in range(int((high - start) / step + 1e-9) + 1)]


def _label(value: float) -> str:
  if value >= 1000:
    return f'{value / 1000:g}k'
  return f'{value:g}'


def _panel(x0: float, y0: float, title: str, x_label: str, y_label: str, xs: Sequence[float],
           series: Sequence[tuple[str, Sequence[Optional[float]]]], log_y: bool,
           x_tick_labels: Optional[Sequence[str]] = None,
           y_range: Optional[tuple[float, float]] = None) -> list[str]:
  """One chart whose outer box starts at (x0, y0); `series` are (name, y per x) pairs.

  The legend wraps onto further rows of _LEGEND_ROW pixels below the panel when it is wider.
  """
  left, top = x0 + _MARGIN_L, y0 + _MARGIN_T
  width, height = _PANEL_W - _MARGIN_L - _MARGIN_R, _PANEL_H - _MARGIN_T - _MARGIN_B
  values = [v for _, ys in series for v in ys if v is not None and v > 0]
  x_low, x_high = min(xs) / 1.5, max(xs) * 1.5
  if log_y:
    y_low, y_high = min(values) / 1.5, max(values) * 1.5
    y_ticks = _decades(y_low, y_high)
    y_pos = lambda v: top + height * (1 - math.log(v / y_low) / math.log(y_high / y_low))
  else:
    y_low, y_high = y_range or (0.0, max(values) * 1.15)
    y_ticks = _linear_ticks(y_low, y_high)
    y_pos = lambda v: top + height * (1 - (v - y_low) / (y_high - y_low))
  x_pos = lambda v: left + width * math.log(v / x_low) / math.log(x_high / x_low)
  esc = saxutils.escape
  out = [f'<text x="{x0 + _PANEL_W / 2}" y="{y0 + 20}" text-anchor="middle" '
         f'font-weight="bold">{esc(title)}</text>',
         f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" '
         'stroke="#444"/>']
  for tick in y_ticks:
    y = y_pos(tick)
    out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" '
               'stroke="#ddd"/>')
    out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
  for tick, label in zip(xs, x_tick_labels or [_label(v) for v in xs]):
    x = x_pos(tick)
    out.append(f'<line x1="{x:.1f}" y1="{top + height}" x2="{x:.1f}" y2="{top + height + 4}" '
               'stroke="#444"/>')
    out.append(f'<text x="{x:.1f}" y="{top + height + 17}" text-anchor="middle">'
               f'{esc(label)}</text>')
  out.append(f'<text x="{left + width / 2}" y="{top + height + 35}" text-anchor="middle">'
             f'{esc(x_label)}</text>')
  out.append(f'<text transform="translate({x0 + 14},{top + height / 2}) rotate(-90)" '
             f'text-anchor="middle">{esc(y_label)}</text>')
  legend_x, legend_y = left, top + height + 52
  for i, (name, ys) in enumerate(series):
    color = _COLORS[i % len(_COLORS)]
    # A log axis has no place for zero; a linear one does (an accuracy of 0 is a result).
    points = [(x_pos(x), y_pos(y)) for x, y in zip(xs, ys)
              if y is not None and (y > 0 or not log_y)]
    if len(points) > 1:
      out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="' +
                 ' '.join(f'{x:.1f},{y:.1f}' for x, y in points) + '"/>')
    out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>' for x, y in points]
    # Legend rows under the axis label, so that it never hides a curve.
    if legend_x > left and legend_x + 16 + _CHAR_W * len(name) > x0 + _PANEL_W:
      legend_x, legend_y = left, legend_y + _LEGEND_ROW
    out.append(f'<circle cx="{legend_x + 4}" cy="{legend_y - 4}" r="3.5" fill="{color}"/>')
    out.append(f'<text x="{legend_x + 11}" y="{legend_y}" fill="{color}">{esc(name)}</text>')
    legend_x += 16 + _CHAR_W * len(name)
  return out


def scaling_svg(scaling: dict) -> str:
  """The SVG document of run_scaling's results (its two curves)."""
  points = scaling['points']
  columns = []
  plan = scaling['plan']
  for curve, x_label, title in (
      ('by_clients_per_round', 'clients per round (expected)',
       f'N = {plan["fixed_total"]:,} clients'),
      ('by_total_clients', 'total clients (one image each)',
       f'{plan["fixed_clients_per_round"]} clients per round')):
    keys = scaling[curve]['points']
    columns.append((title, x_label, scaling[curve]['x'], [points[k] for k in keys]))
  body = []
  for column, (title, x_label, xs, results) in enumerate(columns):
    x0 = column * _PANEL_W
    body += _panel(x0, 0, f'Round time, {title}', x_label, 'median round (s)', xs, [
        ('whole round', [r['median_round_seconds'] for r in results]),
        ('local training', [r['median_phase_seconds']['local_training'] for r in results]),
        ('TFF aggregation, server',
         [r['median_phase_seconds']['tff_aggregation_and_server'] for r in results]),
    ], log_y=True)
    body += _panel(x0, _PANEL_H, f'Peak memory, {title}', x_label, 'peak RSS (MiB)', xs, [
        ('Python process', [r['memory_mib']['python_peak'] for r in results]),
        ('TFF worker', [r['memory_mib']['tff_worker_peak'] for r in results]),
    ], log_y=False)
  width, height = 2 * _PANEL_W, 2 * _PANEL_H
  return '\n'.join(
      [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
       f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
       f'<rect width="{width}" height="{height}" fill="white"/>'] + body + ['</svg>', ''])


def privacy_utility_svg(study: dict) -> str:
  """Mean accuracy per category against the policy scale, one panel per partition."""
  # Imported here: plot.py is otherwise free of the study's module.
  from tff_medical import categories  # pylint: disable=g-import-not-at-top
  from tff_medical.benchmarks import privacy_utility  # pylint: disable=g-import-not-at-top
  scales = study['plan']['policy_scales']
  dp_scales = [s for s in scales if s is not None]
  # Without DP drawn one step right of the largest scale, labelled as such.
  xs = dp_scales + ([max(dp_scales) * 2] if None in scales else [])
  labels = [f'x{s:g}' for s in dp_scales] + (['no DP'] if None in scales else [])
  keys = [privacy_utility.scale_key(s) for s in dp_scales] + (
      ['no_dp'] if None in scales else [])
  names = {'iid': 'IID', 'dirichlet': 'non-IID (Dirichlet)'}
  lowest = min(figures[c]['mean'] for result in study['partitions'].values()
               for figures in result['summary'].values() for c in figures)
  # From a round tenth below the lowest mean to 1, so that close curves stay apart.
  y_range = (max(0.0, math.floor(10 * lowest - 0.2) / 10), 1.0)
  body = []
  for column, (scheme, result) in enumerate(study['partitions'].items()):
    summary = result['summary']
    series = [(categories.DISPLAY_NAMES[c], [summary[k][c]['mean'] for k in keys])
              for c in categories.CATEGORY_IDS] + [('all', [summary[k]['all']['mean']
                                                            for k in keys])]
    body += _panel(column * _PANEL_W, 0, f'{names.get(scheme, scheme)}, '
                   f'{result["clients"]:,} clients', 'policy scale (x seed epsilons)',
                   'test accuracy (mean over seeds)', xs, series, log_y=False,
                   x_tick_labels=labels, y_range=y_range)
  width, height = 2 * _PANEL_W, _PANEL_H + 2 * _LEGEND_ROW
  return '\n'.join(
      [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
       f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
       f'<rect width="{width}" height="{height}" fill="white"/>'] + body + ['</svg>', ''])
