"""docs/BENCHMARKS.md from run_benchmark's results: machine, command, tables, ratios, reading."""

from typing import Optional

from tff_medical import categories
from tff_medical.benchmarks import overhead
from tff_medical.benchmarks import privacy_utility
from tff_medical.benchmarks import round_time
from tff_medical.privacy import policy as policy_lib

_ORDER = [c.value for c in round_time.Contender]
# Above this 1-minute load per core at start or end, the report says the CPU was shared.
_BUSY_LOAD_PER_CORE = 0.75


def _number(value: Optional[float], digits: int = 2) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def _load(value) -> str:
  return 'unknown' if value is None else ' / '.join(f'{v:.2f}' for v in value)


def _machine(results: dict) -> list[str]:
  m = results['machine']
  gpu = (f'yes ({", ".join(m["gpus"])}; only in-process TensorFlow can use it, TFF\'s worker '
         'is CPU only)' if m['gpu_used'] else
         'no (CPU only). On a GPU, client training (in-process TensorFlow) would run there and '
         'TFF\'s aggregation would stay on the CPU; that is unmeasured: no machine of this '
         'project has had a GPU for a benchmark yet')
  lines = [
      '## Machine', '',
      f'- CPU: {m["cpu_model"]}, {m["cpu_count"]} logical cores '
      f'({m["cpus_usable"]} usable by this process)',
      f'- Memory: {m["memory_gib"]} GiB',
      f'- Python {m["python"]}, TensorFlow {m["tensorflow"]}, '
      f'TensorFlow Federated {m["tensorflow_federated"]}',
      f'- GPU used: {gpu}',
      f'- Load average (1 / 5 / 15 min) at start: {_load(results["load_average_start"])}; '
      f'at end: {_load(results["load_average_end"])}',
      f'- Date (UTC): {results["date_utc"]}; whole run {results["wall_seconds"]:.0f} s', '',
  ]
  loads = [l[0] for l in (results['load_average_start'], results['load_average_end']) if l]
  if loads and max(loads) > _BUSY_LOAD_PER_CORE * (m['cpus_usable'] or m['cpu_count'] or 1):
    lines += [
        f'**The CPU was shared**: the 1-minute load reached {max(loads):.2f} on '
        f'{m["cpus_usable"] or m["cpu_count"]} cores, so another job competed with this run. '
        'Every contender ran in the same interleaved rounds, so the ratios are less affected '
        'than the seconds, but both are noisier than on an idle machine.', '']
  return lines


def _method(results: dict) -> list[str]:
  first = results['settings'][0]
  s = first['setting']
  lines = ['## What is timed', '']
  for value in _ORDER:
    lines.append(f'- `{value}`: {round_time.DESCRIPTIONS[round_time.Contender(value)]}.')
  lines += [
      '',
      f'Same phantom examples (seed {s["seed"]}), model `build_cnn({tuple(s["conv_filters"])})`, '
      f'batch size {s["batch_size"]}, {s["local_epochs"]} local epoch(s), client SGD learning '
      f'rate {s["client_learning_rate"]}, server SGD learning rate 1.0. DP rounds: noise '
      f'multiplier {s["noise_multiplier"]} for TFF\'s `dp_aggregator` and for each of our six '
      'categories (not 1.0: `dp_aggregator` refuses 1.0 at 10 clients per round, its clipped-'
      'count noise being fixed at 0.05 x clients; the noise\'s size does not change the work).',
      '',
      'A round starts from the clients\' uint8 arrays in memory and ends when the new global '
      'model is back in Python: the TFF rounds build each client\'s `tf.data.Dataset` in it, as '
      'a data source does; ours replicates `tff_medical.training.program`\'s round (released '
      'categories set, one `CohortTrainer.train` call for the sampled clients, `process.next`), '
      'without the program\'s checkpoint, ledger, audit and release steps. Each contender first '
      'runs '
      f'{first["warmup_rounds"]} untimed round(s) (tracing, compilation); then '
      f'{first["timed_rounds"]} timed rounds, interleaved across contenders so that a change '
      'of load touches all alike, timed with `time.perf_counter`; the tables give the median. '
      'Ratios are median round times (above 1: slower than the reference).', '']
  return lines


def _table(setting_result: dict) -> list[str]:
  contenders = setting_result['contenders']
  lines = [
      f'## {setting_result["setting"]["name"]} ({setting_result["num_examples"]} examples a '
      'round)', '',
      '| contender | median round (s) | min - max (s) | examples / round | local SGD steps | '
      'examples / s | x Keras floor | x TFF DP round |',
      '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for value in _ORDER:
    if value not in contenders:
      continue
    c = contenders[value]
    examples = sorted(set(c['examples_per_round']))
    lines.append(
        f'| `{value}` | {c["median_seconds"]:.3f} | {c["min_seconds"]:.3f} - '
        f'{c["max_seconds"]:.3f} | {", ".join(map(str, examples))} | '
        f'{c["local_steps_per_round"]} | {_number(c["examples_per_second"], 0)} | '
        f'{_number(c.get("ratio_to_keras"))} | {_number(c.get("ratio_to_tff_dp"))} |')
  lines.append('')
  phase_lines = []
  for value in _ORDER:
    phases = contenders.get(value, {}).get('median_phase_seconds')
    if phases:
      phase_lines.append(f'- `{value}`: ' + ', '.join(
          f'{name.replace("_", " ")} {seconds:.3f} s' for name, seconds in phases.items()))
  if phase_lines:
    lines += ['Our rounds by phase (medians):', ''] + phase_lines + ['']
  lines.append('Warm-up (first round, with tracing), s: ' + ', '.join(
      f'`{v}` {contenders[v]["warmup_seconds"]:.1f}' for v in _ORDER if v in contenders))
  lines.append('')
  return lines


def _targets(results: dict) -> list[str]:
  lines = ['## Targets', '',
           f'| setting | class-aware DP / TFF DP (target <= {round_time.TARGET_VS_TFF_DP}) | '
           f'class-aware DP / Keras floor (later goal <= {round_time.TARGET_VS_KERAS}) |',
           '|---|---:|---:|']
  for result in results['settings']:
    cells = []
    for key in ('class_aware_dp_vs_tff_dp', 'class_aware_dp_vs_keras'):
      target = result['targets'].get(key)
      cells.append('-' if target is None else
                   f'{target["ratio"]:.2f} ({"met" if target["met"] else "not met"})')
    lines.append(f'| {result["setting"]["name"]} | {cells[0]} | {cells[1]} |')
  return lines + ['']


def _reading(results: dict) -> list[str]:
  facts = []
  for result in results['settings']:
    c = result['contenders']
    needed = ('keras', 'tff_dp', 'class_aware_dp', 'class_aware')
    if not all(k in c for k in needed):
      continue
    ours, tff_dp = c['class_aware_dp'], c['tff_dp']
    phases = ours['median_phase_seconds']
    facts.append(
        f'With {result["setting"]["name"]}, our DP round took {ours["median_seconds"]:.2f} s, '
        f'{ours["ratio_to_tff_dp"]:.2f}x TFF\'s own DP round ({tff_dp["median_seconds"]:.2f} s, '
        f'{"faster" if ours["ratio_to_tff_dp"] < 1 else "slower"}) and '
        f'{ours["ratio_to_keras"]:.2f}x the Keras floor ({c["keras"]["median_seconds"]:.2f} s); '
        f'{phases.get("local_training", 0):.2f} s of it was local training and '
        f'{phases.get("tff_aggregation_and_server", 0):.2f} s TFF\'s aggregation and server '
        f'update (DP off, the round took {c["class_aware"]["median_seconds"]:.2f} s).')
  if not facts:
    return []
  explanation = (
      'Where our round beats TFF\'s, the reason is where client training runs: TFF\'s round '
      'serializes every client\'s dataset into its C++ worker and executes the client graph '
      'once per client, a cost paid per client, so it grows with the number of clients; ours '
      'trains every client in this process with one compiled tf.function reused for all of '
      'them, and hands TFF only the finished sub-updates. Where it is slower than the Keras '
      'floor, the tables show why: per-category training runs six small batch loops per client '
      '(the local SGD steps column: more steps on smaller batches, so per-step overhead weighs '
      'more, the more so with many small clients), each client ships six sub-updates instead of '
      'one into TFF\'s worker, and the DP aggregation clips, sums and noises six of them (six '
      'adaptive-clip Gaussian aggregators instead of one). The Keras floor does none of the '
      'federated work (no restart from the global model per client, no aggregation, no '
      'transfer), so it bounds what a federated round can reach on this machine; the ratio to '
      'TFF\'s DP round is the like-for-like one. These are single-machine figures on a shared '
      'CPU: compare ratios within one run, not seconds across runs.')
  return ['## Reading', '', ' '.join(facts) + ' ' + explanation, '']


# What `make` runs for each mode of experiments/bench.py.
MAKE_TARGETS = {'quick': 'make bench', 'full': 'make bench-full'}


def render_markdown(results: dict, command: str, plot_link: Optional[str] = None,
                    example_level: Optional[dict] = None,
                    study_plot_link: Optional[str] = None) -> str:
  """The whole page; the scaling section when `results` has one (`plot_link`: its SVG).

  `example_level`: docs/example_level.json (experiments/example_level_bench.py's figures, an
  hour's run kept apart), shown as the per-category accuracy at a few sites.
  """
  mode = results.get('flags', {}).get('mode')
  lines = [
      '# Benchmarks: round time and scaling', '',
      '<!-- Generated by experiments/bench.py; rerunning it rewrites this file. -->', '',
      'One round of plain Keras training, TFF FedAvg (without and with TFF\'s DP aggregator) and '
      'our class-aware process (with and without DP), on the same clients, data and model, '
      'measured in one run' + ('; then how our DP round scales with the clients per round and '
                               'the total clients' if 'scaling' in results else '') +
      '. Figures: docs/benchmarks.json.', '',
      '## Command', '', '```', command, '```', '',
  ]
  if mode in MAKE_TARGETS:
    other = [f'`{target}` ({name} mode)' for name, target in MAKE_TARGETS.items()
             if name != mode]
    lines += [f'or `{MAKE_TARGETS[mode]}` (this page is from the {mode} mode; '
              + ', '.join(other) + ' runs the other).', '']
  lines += [
      'Accuracy under DP, each page with its commands: [TUNING.md](TUNING.md) (how the demo '
      'setting was chosen on a validation draw, and what the seed policy and the policy '
      'scaled by 0.25 to 4 cost against non-private training) and '
      '[EXAMPLE_LEVEL.md](EXAMPLE_LEVEL.md) (example-level DP-SGD with 5 sites against '
      'non-private training; client-level DP is refused at 5 sites; its per-category table is '
      'repeated at the end of this page).', '',
      'Memory while a site ingests from a PACS (500 to 3,000 instances from a real Orthanc): '
      '[PACS.md](PACS.md), with its command.', '',
  ]
  lines += _machine(results) + _method(results)
  for result in results['settings']:
    lines += _table(result)
  lines += _targets(results) + _reading(results)
  if 'scaling' in results:
    lines += _scaling(results['scaling'], plot_link)
  if 'privacy_utility' in results:
    lines += _privacy_utility(results['privacy_utility'], study_plot_link)
  lines += overhead.render(results.get('overhead'),
                          results.get('flags', {}).get('scaling_config', 'configs/demo.py'))
  lines += _gpu(results)
  if example_level is not None:
    lines += _example_level(example_level)
  return '\n'.join(lines)


def _gpu(results: dict) -> list[str]:
  gpus = results.get('machine', {}).get('gpus') or []
  if gpus:
    return []
  return ['## GPU', '',
          'Unmeasured: no GPU was available to this project when this page was written (the '
          'machine above has none). The class-aware round runs on one GPU when TensorFlow sees '
          'one (client training in TensorFlow; TFF\'s C++ worker stays on the CPU).', '']


def _percent(value: float) -> str:
  return f'{100 * value:.1f}'


def _example_level(figures: dict) -> list[str]:
  """Accuracy per category at the seed policy, few sites: example level, client level, none."""
  config, results = figures['config'], figures['results']
  client = figures['client_level']
  budgets = figures['ledger']['categories']
  refused = client.get('status') == 'refused'
  # The bench trains client level only where calibration accepts it (never so far at 5 sites).
  client_cell = lambda key: ('refused' if refused else
                             _percent(client['final'][key]) if 'final' in client else 'not run')

  def row(name, key, budget=''):
    return (name, budget, _percent(results['example']['final'][key]), client_cell(key),
            _percent(results['non_private']['final'][key]))

  rows = [row(categories.DISPLAY_NAMES[c], f'accuracy/{c}', f'{budgets[c]["target_epsilon"]:g}')
          for c in categories.CATEGORY_IDS] + [row('all', 'accuracy')]
  lines = [
      '## Accuracy per category at a few sites (seed policy)', '',
      f'{config["num_clients"]} sites holding {config["dataset"]} data of MedNIST size '
      f'({config["num_per_category"]} images a category), {config["total_rounds"]} rounds, '
      'every site in every round; test accuracy in %. From docs/example_level.json, written '
      f'by `{figures["command"].strip()}` ({figures["date_utc"]}, {figures["seconds"]:.0f} s; '
      'this page\'s command does not rerun it); details, clip-only contender and per-site '
      'calibration in [EXAMPLE_LEVEL.md](EXAMPLE_LEVEL.md).', '',
      '| category | budget ε | example-level DP | client-level DP | non-private |',
      '|---|---:|---:|---:|---:|',
  ] + ['| ' + ' | '.join(row) + ' |' for row in rows] + ['']
  if refused:
    lines += [f'Client-level DP on the same sites is refused by calibration: '
              f'"{client["message"]}"', '']
  return lines

def _ms(seconds: float) -> str:
  return f'{1000 * seconds:.1f}'


def _spread(result: dict) -> float:
  """Relative min-max spread of a point's timed rounds: the noise a comparison must beat."""
  seconds = [r['seconds'] for r in result['rounds']]
  return (max(seconds) - min(seconds)) / result['median_round_seconds']


def _scaling_row(r: dict, first_cells: list[str]) -> str:
  phases, memory = r['median_phase_seconds'], r['memory_mib']
  cells = first_cells + [
      f'{r["mean_clients_per_round"]:.1f}', f'{r["mean_examples_per_round"]:.1f}',
      f'{r["median_round_seconds"]:.3f}', f'{phases["local_training"]:.3f}',
      f'{phases["tff_aggregation_and_server"]:.3f}', _ms(phases['sampling']),
      f'{r["seconds_per_1000_examples"]:.2f}', f'{r["warmup_seconds"][0]:.1f}'
      if r['warmup_seconds'] else '-',
      _number(memory['rss_after_setup'], 0), _number(memory['python_peak'], 0),
      _number(memory['tff_worker_peak'], 0)]
  return '| ' + ' | '.join(cells) + ' |'


_SCALING_COLUMNS = ('clients sampled (mean) | examples / round (mean) | median round (s) | '
                    'local training (s) | TFF aggregation + server (s) | sampling (ms) | '
                    's / 1000 examples | warm-up round (s) | RSS after setup (MiB) | '
                    'Python peak RSS (MiB) | TFF worker peak RSS (MiB) |')


def _per_client(lo: dict, hi: dict) -> str:
  """' (about X and Y MiB more per client sampled)' between two points, when both are known."""
  clients = hi['mean_clients_per_round'] - lo['mean_clients_per_round']
  slopes = []
  for name in ('python_peak', 'tff_worker_peak'):
    low, high = lo['memory_mib'][name], hi['memory_mib'][name]
    if low is None or high is None or clients <= 0:
      return ''
    slopes.append((high - low) / clients)
  sent = ''
  if hi.get('model_parameters'):
    sent = (f', against the {categories.NUM_CATEGORIES} x {hi["model_parameters"]:,} float32 '
            f'({categories.NUM_CATEGORIES * 4 * hi["model_parameters"] / 1024:.0f} KiB) of '
            'sub-updates a client sends')
  return (f' (about {slopes[0]:.2f} and {slopes[1]:.2f} MiB more per client sampled{sent})')


def _scaling_reading(scaling: dict) -> list[str]:
  points = scaling['points']
  facts = []
  by_m = [points[k] for k in scaling['by_clients_per_round']['points']]
  if len(by_m) >= 2:
    lo, hi = by_m[0], by_m[-1]
    facts.append(
        f'From {lo["point"]["clients_per_round"]} to {hi["point"]["clients_per_round"]} clients '
        f'a round (expected; {lo["mean_clients_per_round"]:.0f} and '
        f'{hi["mean_clients_per_round"]:.0f} sampled on average), the median round went from '
        f'{lo["median_round_seconds"]:.2f} s to {hi["median_round_seconds"]:.2f} s '
        f'({hi["median_round_seconds"] / lo["median_round_seconds"]:.1f}x for '
        f'{hi["mean_examples_per_round"] / max(lo["mean_examples_per_round"], 1e-9):.1f}x the '
        'examples), and the Python peak from '
        f'{_number(lo["memory_mib"]["python_peak"], 0)} to '
        f'{_number(hi["memory_mib"]["python_peak"], 0)} MiB and TFF\'s worker\'s from '
        f'{_number(lo["memory_mib"]["tff_worker_peak"], 0)} to '
        f'{_number(hi["memory_mib"]["tff_worker_peak"], 0)} MiB'
        + _per_client(lo, hi) + ': the cost follows the clients trained, with a fixed part per '
        'round (the TFF call) that weighs most at few clients.')
  by_n = [points[k] for k in scaling['by_total_clients']['points']]
  if len(by_n) >= 2:
    lo, hi = by_n[0], by_n[-1]
    growth = hi['seconds_per_1000_examples'] / lo['seconds_per_1000_examples']
    noise = max(_spread(r) for r in by_n)
    verdict = ('within' if growth <= 1 + noise else 'beyond')
    facts.append(
        f'From {lo["point"]["total_clients"]:,} to {hi["point"]["total_clients"]:,} total '
        f'clients ({hi["point"]["total_clients"] / lo["point"]["total_clients"]:.0f}x, the same '
        f'{lo["point"]["clients_per_round"]} a round), the round cost per 1000 examples trained '
        f'went from {lo["seconds_per_1000_examples"]:.2f} s to '
        f'{hi["seconds_per_1000_examples"]:.2f} s ({growth:.2f}x), {verdict} the spread of the '
        f'rounds within one point (up to {100 * noise:.0f}% of its median); the only per-round '
        'work over all N clients, the sampler\'s draw, took '
        f'{_ms(lo["median_phase_seconds"]["sampling"])} ms and '
        f'{_ms(hi["median_phase_seconds"]["sampling"])} ms. What does grow with N is setup: the '
        f'data load ({lo["setup_seconds"]["data_load"]:.2f} s to '
        f'{hi["setup_seconds"]["data_load"]:.2f} s), the partition '
        f'({lo["setup_seconds"]["partition_and_sampler"]:.2f} s to '
        f'{hi["setup_seconds"]["partition_and_sampler"]:.2f} s) and the memory held after it '
        f'({_number(lo["memory_mib"]["rss_after_setup"], 0)} to '
        f'{_number(hi["memory_mib"]["rss_after_setup"], 0)} MiB: the images, 4 KiB each).')
  return facts


def _scaling(scaling: dict, plot_link: Optional[str]) -> list[str]:
  plan, config, points = scaling['plan'], scaling['config'], scaling['points']
  model = config['model']
  cache = scaling['image_cache']
  first = next(iter(points.values()))['point']
  lines = [
      '## Scaling: our DP round against clients per round and total clients', '',
      'Each point runs in a fresh Python process and replicates `tff_medical.training.program`\'s '
      'round for the demo\'s shape (configs/demo.py): one image a client, model '
      f'`build_cnn({tuple(model["conv_filters"])}, input_pooling={model["input_pooling"]}, '
      f'head={model["head"]!r})`, client batch {config["client"]["batch_size"]} at learning rate '
      f'{config["client"]["learning_rate"]}, server {config["server"]["optimizer"]} at '
      f'{config["server"]["learning_rate"]}, {config["sampling"]} sampling with the program\'s '
      f'sampler, {config["partition"]} partition. A round: sample, look up each sampled '
      'client\'s images, one `CohortTrainer.train` call for them, `process.next` (class-aware '
      f'DP, noise multiplier {first["noise_multiplier"]} for every category: the noise\'s size '
      'does not change the work); no checkpoint, ledger, audit, release or evaluation. Setup '
      '(data load, '
      'partition and sampler, building the process and trainer) is timed apart from the rounds; '
      f'then {first["warmup_rounds"]} warm-up round(s) (tracing, TFF compilation) and '
      f'{first["timed_rounds"]} timed rounds, of which the tables give the median. With Poisson '
      'sampling the clients in a round vary; "s / 1000 examples" divides the timed rounds\' '
      'seconds by the examples they trained.', '',
      'Memory is peak resident set size, VmHWM from /proc (not tracemalloc, which misses '
      'TensorFlow\'s allocations; not `getrusage` ru_maxrss, which Linux carries over from the '
      'parent process across fork and exec): of the point\'s Python process and of TFF\'s C++ '
      'worker, a separate process that runs the aggregation (read before it stops); their sum '
      'bounds the combined peak from above. "RSS after setup" is the Python process once data, '
      'partition and process are built (TensorFlow and TFF alone hold most of it).', '',
      f'Images: {cache["num_images"]:,} phantoms, generated once for the run in '
      f'{cache["generate_seconds"]:.1f} s and cached as .npy; each point reads the first N. '
      '(The program generates its phantoms at every start instead, a setup cost of that size '
      'again; MedNIST is read from disk.)', '',
  ]
  if plot_link:
    lines += [f'![Round time and peak memory against clients per round and total clients]'
              f'({plot_link})', '']
  lines += [f'### Against clients per round (N = {plan["fixed_total"]:,} clients)', '',
            '| clients per round (expected) | ' + _SCALING_COLUMNS,
            '|---:|' + '---:|' * 11]
  for key in scaling['by_clients_per_round']['points']:
    r = points[key]
    lines.append(_scaling_row(r, [str(r['point']['clients_per_round'])]))
  lines += ['', f'### Against total clients ({plan["fixed_clients_per_round"]} clients per '
            'round, expected)', '',
            '| total clients | data load (s) | partition + sampler (s) | build (s) | ' +
            _SCALING_COLUMNS, '|---:|' + '---:|' * 14]
  for key in scaling['by_total_clients']['points']:
    r = points[key]
    setup = r['setup_seconds']
    lines.append(_scaling_row(r, [
        f'{r["point"]["total_clients"]:,}', f'{setup["data_load"]:.2f}',
        f'{setup["partition_and_sampler"]:.2f}', f'{setup["build_process"]:.1f}']))
  lines += ['', 'Load average (1 / 5 / 15 min) during the scaling points: at start '
            f'{_load(scaling["load_average_start"])}, at end {_load(scaling["load_average_end"])}; '
            f'{scaling["wall_seconds"]:.0f} s for the whole curve (image generation included).', '']
  reading = _scaling_reading(scaling)
  if reading:
    lines += ['### Reading', '', ' '.join(reading), '']
  return lines


def _spread_cell(figure: dict, digits: int = 0) -> str:
  mean, low, high = (f'{100 * figure[k]:.{digits}f}' for k in ('mean', 'min', 'max'))
  return mean if low == high else f'{mean} ({low}-{high})'


# Within this many accuracy points of non-private training: issue 6's goal at the seed policy.
GOAL_POINTS = 5.0


def _privacy_utility(study: dict, plot_link: Optional[str]) -> list[str]:
  """The privacy-utility tables (one per partition), the goal's verdict and the plot."""
  plan = study['plan']
  seed_policy = policy_lib.default_policy()
  levels = ('HeadCT', 'AbdomenCT', 'CXR')  # One category of each privacy level.
  lines = [
      '## Privacy-utility: accuracy per category against the policy scale', '',
      'The embedded phantoms' + (' at MedNIST size' if plan['num_per_category'] *
                                 categories.NUM_CATEGORIES >= 50000 else '') +
      f' ({plan["num_per_category"]:,} a category, '
      f'{plan["num_per_category"] * categories.NUM_CATEGORIES:,} images; '
      f'{100 * plan["test_fraction"]:g}% held out as the test split, never trained on) split '
      f'into {plan["num_clients"]:,} clients, IID and non-IID (Dirichlet over categories, '
      f'alpha {plan["dirichlet_alpha"]:g}); {plan["clients_per_round"]} clients a round '
      f'(Poisson), {plan["rounds"]} rounds, the noise calibrated for them; the demo\'s model '
      '(16x16 pooled input, one 8-filter conv, flatten head: 3,158 parameters), client and '
      'server optimizers and clipping (configs/demo.py), the clip target following the images a '
      'client holds. The whole policy is scaled (x1 is the seed policy); "no DP" trains the same '
      'way without clipping or noise. Seeds: ' + ', '.join(str(s) for s in plan['seeds']) +
      ' (model initialization, client sampling and noise; the phantoms and the partition are the '
      'same in every run). Test accuracy, %: mean over '
      'seeds (min-max).', '',
      'Trained by the surrogate of class-aware DP-FedAvg '
      '([tff_medical/benchmarks/surrogate.py](../tff_medical/benchmarks/surrogate.py)): the '
      'per-category sub-updates of one local step (checked against the product\'s LocalTrainer '
      'in tests/test_surrogate.py), the calibrated noise and clipped-count noise of '
      'tff_medical.privacy.accounting, TFF\'s adaptive clip and server optimizer updates, '
      'without TFF\'s per-round overhead; the real program\'s figures for the demo are in '
      '[TUNING.md](TUNING.md) and the README.', '',
  ]
  if plot_link:
    lines += [f'![accuracy against the policy scale]({plot_link})', '']
  for scheme, result in study['partitions'].items():
    summary = result['summary']
    lines += [
        f'### {"IID" if scheme == "iid" else "Non-IID (Dirichlet)"}', '',
        f'{result["train_examples"]:,} training images over {result["clients"]:,} clients '
        f'({result["images_per_client"]:.2f} a client, {result["mean_categories_held"]:.2f} '
        f'categories held on average, at most {result["largest_category_group"]} images of one '
        f'category at one client); clip target {result["clip_target"]:.3f}; '
        f'{result["test_examples"]:,} test images.', '',
        '| policy | epsilon (High / Medium / Low) | all | ' +
        ' | '.join(categories.DISPLAY_NAMES[c] for c in categories.CATEGORY_IDS) + ' |',
        '|---|---|---:|' + '---:|' * categories.NUM_CATEGORIES,
    ]
    for scale in plan['policy_scales']:
      key = privacy_utility.scale_key(scale)
      epsilons = ('-' if scale is None else ' / '.join(
          f'{seed_policy.budget(c).epsilon * scale:g}' for c in levels))
      name = 'no DP' if scale is None else (f'**{key} (seed)**' if scale == 1 else key)
      lines.append(f'| {name} | {epsilons} | {_spread_cell(summary[key]["all"], 1)} | ' +
                   ' | '.join(_spread_cell(summary[key][c]) for c in categories.CATEGORY_IDS) +
                   ' |')
    lines.append('')
    if 'x1' in summary and 'no_dp' in summary:
      gaps = privacy_utility.gaps_to_non_private(summary)
      beyond = {c: g for c, g in gaps.items() if g < -GOAL_POINTS}
      verdict = ('every category is within {:g} points of non-private training (mean over '
                 'seeds)'.format(GOAL_POINTS) if not beyond else
                 'beyond {:g} points of non-private training: '.format(GOAL_POINTS) +
                 ', '.join(f'{categories.DISPLAY_NAMES[c]} ({g:+.1f})'
                           for c, g in beyond.items()))
      lines += [f'At the seed policy {verdict}; per category (points): ' +
                ', '.join(f'{categories.DISPLAY_NAMES[c]} {g:+.1f}' for c, g in gaps.items()) +
                '.', '']
  lines += [f'The whole study took {study["seconds"]:.0f} s.', '']
  return lines
