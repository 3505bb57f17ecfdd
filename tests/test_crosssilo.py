"""Cross-silo deployment: SecAgg+ with our DP math, mutual TLS + node auth, faults.

Fast tier: the protocol runs in-process (a test double stands in for the SuperLink and routes
Flower messages to real ClientApps with flwr's secaggplus_mod), the SuperLink runs for real for
the certificate tests. Slow tier: coordinator and three site processes on loopback.
"""

import copy
import csv
import datetime
import json
import os
import signal
import subprocess
import sys
import uuid

import dp_accounting
import numpy as np
import pytest

from tff_medical import categories

flwr = pytest.importorskip('flwr')

from flwr.common import Context, DEFAULT_TTL, Message, Metadata, RecordSet  # pylint: disable=g-import-not-at-top
from flwr.common.secure_aggregation import quantization  # pylint: disable=g-import-not-at-top
from flwr.common.secure_aggregation.secaggplus_constants import Key  # pylint: disable=g-import-not-at-top
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS  # pylint: disable=g-import-not-at-top
from flwr.common.secure_aggregation.secaggplus_constants import Stage  # pylint: disable=g-import-not-at-top
from flwr.common import bytes_to_ndarray  # pylint: disable=g-import-not-at-top

from tff_medical.aggregation import class_aware  # pylint: disable=g-import-not-at-top
from tff_medical.crosssilo import coordinator  # pylint: disable=g-import-not-at-top
from tff_medical.crosssilo import mechanism  # pylint: disable=g-import-not-at-top
from tff_medical.crosssilo import provisioning  # pylint: disable=g-import-not-at-top
from tff_medical.crosssilo import secagg  # pylint: disable=g-import-not-at-top
from tff_medical.crosssilo import site_runtime  # pylint: disable=g-import-not-at-top
from tff_medical.crosssilo import site_worker  # pylint: disable=g-import-not-at-top
from tff_medical.crosssilo import transport  # pylint: disable=g-import-not-at-top
from tff_medical.privacy import accounting  # pylint: disable=g-import-not-at-top
from tff_medical.privacy import calibration
from tff_medical.training import config as config_lib  # pylint: disable=g-import-not-at-top

from helpers import reference_epsilon  # pylint: disable=g-bad-import-order,g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InProcessDriver:
  """Visible test double for the SuperLink + Driver: delivers each message to a ClientApp.

  Messages are deep-copied as serialization would; every reply is kept (what the coordinator
  receives). A node listed in `drop_at` stops answering from that SecAgg+ stage on, as a site
  that dies does. `sites`: {node: site} as the SuperLink's identity binding reports it (default:
  the i-th node in order is site-i).
  """

  def __init__(self, apps, drop_at=None, sites=None):
    self.apps = dict(apps)
    self.sites = dict(sites) if sites is not None else {
        n: f'site-{i}' for i, n in enumerate(sorted(apps))}
    self.contexts = {n: Context(node_id=n, node_config={}, state=RecordSet(), run_config={})
                     for n in apps}
    self.replies = []
    self.drop_at = dict(drop_at or {})
    self.dead = set()

  def get_node_ids(self):
    return [n for n in self.apps if n not in self.dead]

  def node_identities(self):
    return {n: s for n, s in self.sites.items() if n not in self.dead}

  def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
    del ttl
    return Message(metadata=Metadata(run_id=1, message_id='', src_node_id=0,
                                     dst_node_id=dst_node_id, reply_to_message='',
                                     group_id=group_id, ttl=DEFAULT_TTL,
                                     message_type=message_type), content=content)

  def send_and_receive(self, messages, timeout=None):
    del timeout
    out = []
    for message in messages:
      message = copy.deepcopy(message)
      message.metadata._message_id = uuid.uuid4().hex  # pylint: disable=protected-access
      node = message.metadata.dst_node_id
      records = message.content.configs_records
      # A SecAgg+ stage, or the message type of a plain message (the example-level report).
      stage = (records[RECORD_KEY_CONFIGS][Key.STAGE] if RECORD_KEY_CONFIGS in records
               else message.metadata.message_type)
      if node in self.dead or self.drop_at.get(node) == stage:
        self.dead.add(node)
        continue
      reply = self.apps[node](message, self.contexts[node])
      self.replies.append((stage, node, reply))
      out.append(reply)
    return out

  def uploads(self):
    """{node: [masked arrays]} the coordinator received in the collect stage."""
    return {node: [bytes_to_ndarray(b) for b in
                   reply.content.configs_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            for stage, node, reply in self.replies if stage == Stage.COLLECT_MASKED_VECTORS}


def _vectors(n=3, d=200, seed=0):
  rng = np.random.default_rng(seed)
  return {11 * (i + 1): rng.uniform(-1, 1, d) for i in range(n)}


def _apps(vectors):
  return {node: secagg.make_site_app(lambda w, c, v=v: v) for node, v in vectors.items()}


def test_secure_round_releases_only_the_sum_and_masks_each_upload():
  vectors = _vectors()
  driver = InProcessDriver(_apps(vectors))
  result = secagg.run_secure_round(driver, list(vectors), 1, [np.zeros(2)], {'round': 1},
                                   threshold=2, timeout=None)
  resolution = 2 * mechanism.CLIPPING_RANGE / mechanism.QUANTIZATION_RANGE
  assert result.contributors == 3
  np.testing.assert_allclose(result.vector, sum(vectors.values()), atol=3 * resolution)
  uploads = driver.uploads()
  assert sorted(uploads) == sorted(vectors)
  for node, vector in vectors.items():
    masked = uploads[node][1].astype(np.float64)  # [0] is the weight factor.
    quantized = quantization.quantize([vector], mechanism.CLIPPING_RANGE,
                                      mechanism.QUANTIZATION_RANGE)[0]
    # Unmasked, an entry is in [0, 2**22]; masked, it is uniform on [0, 2**32).
    assert np.mean(np.abs(masked - quantized) > mechanism.QUANTIZATION_RANGE) > 0.95
    assert abs(masked.mean() / mechanism.MODULUS_RANGE - 0.5) < 6 * np.sqrt(1 / 12 / masked.size)
    assert abs(np.corrcoef(masked, vector)[0, 1]) < 6 / np.sqrt(masked.size)


def test_secure_round_completes_with_survivors_above_threshold():
  vectors = _vectors()
  nodes = list(vectors)
  driver = InProcessDriver(_apps(vectors), drop_at={nodes[2]: Stage.COLLECT_MASKED_VECTORS})
  result = secagg.run_secure_round(driver, nodes, 1, [np.zeros(2)], {}, threshold=2,
                                   timeout=None)
  assert result.contributors == 2
  assert sorted(result.node_ids) == sorted(nodes[:2])
  np.testing.assert_allclose(result.vector, vectors[nodes[0]] + vectors[nodes[1]], atol=1e-5)
  # A site that drops after uploading (unmask stage) is still in the sum: its mask is rebuilt.
  driver = InProcessDriver(_apps(vectors), drop_at={nodes[2]: Stage.UNMASK})
  result = secagg.run_secure_round(driver, nodes, 2, [np.zeros(2)], {}, threshold=2,
                                   timeout=None)
  np.testing.assert_allclose(result.vector, sum(vectors.values()), atol=1e-5)


def test_secure_round_is_abandoned_below_threshold():
  vectors = _vectors()
  nodes = list(vectors)
  driver = InProcessDriver(_apps(vectors), drop_at={
      nodes[1]: Stage.COLLECT_MASKED_VECTORS, nodes[2]: Stage.COLLECT_MASKED_VECTORS})
  assert secagg.run_secure_round(driver, nodes, 1, [np.zeros(2)], {}, threshold=2,
                                 timeout=None) is None


def _plan(z=0.5, m=3):
  splits = calibration.category_splits({c: z for c in categories.CATEGORY_IDS}, m,
                                      max_count_noise_fraction=1.0)
  return mechanism.MechanismPlan(splits, class_aware.AdaptiveClipSettings(0.5, 0.5, 0.2))


def test_quantized_round_trip_matches_tf_privacy_records():
  plan = _plan()
  queries = mechanism.category_queries(plan)
  states = mechanism.initial_states(queries)
  params = mechanism.sample_params(queries, states)
  shapes = [(3, 4), (5,)]
  rng = np.random.default_rng(1)
  sites = [[[rng.normal(0, s, shape).astype(np.float32) for shape in shapes]
            for s in (0.01, 0.1, 1.0, 0.2, 0.0, 3.0)] for _ in range(3)]
  seed = 12345
  encoded = [mechanism.encode_site_records(queries, params, s, seed) for s in sites]
  # Flower's quantization of each site, integer sum, and the workflow's dequantization.
  quantized = [quantization.quantize([e], mechanism.CLIPPING_RANGE,
                                     mechanism.QUANTIZATION_RANGE)[0] for e in encoded]
  d = mechanism.num_parameters(shapes)
  big_d = mechanism.padded_length(d)
  assert big_d == 32
  for q in quantized:  # The rounded record is within the clip norm.
    back = quantization.dequantize([q], mechanism.CLIPPING_RANGE,
                                   mechanism.QUANTIZATION_RANGE)[0]
    for i in range(categories.NUM_CATEGORIES):
      part = back[i * (big_d + 1):i * (big_d + 1) + big_d] / np.sqrt(big_d)
      assert np.linalg.norm(part) <= 1.0 + 1e-12
  total = quantization.dequantize([np.sum(quantized, axis=0)], mechanism.CLIPPING_RANGE,
                                  mechanism.QUANTIZATION_RANGE)[0]
  total -= (len(sites) - 1) * mechanism.CLIPPING_RANGE  # As the workflow does.
  clip = {c: mechanism.clip_norm(queries[c], states[c]) for c in categories.CATEGORY_IDS}
  decoded = mechanism.decode_secure_sum(total, 3, clip, shapes, seed, max_sites=3)
  # Independent: clip each sub-update to the norm with numpy, count the unclipped ones, and
  # apply the encoding's bound with a dense Hadamard matrix (scipy) and the round's signs.
  from scipy import linalg  # pylint: disable=g-import-not-at-top
  hadamard = linalg.hadamard(big_d) / np.sqrt(big_d)
  for i, c in enumerate(categories.CATEGORY_IDS):
    signs = mechanism._signs(seed, i, big_d)  # pylint: disable=protected-access
    want = np.zeros(big_d)
    bits = 0.0
    for site in sites:
      flat = np.concatenate([v.ravel() for v in site[i]]).astype(np.float64)
      norm = np.linalg.norm(flat)
      scale = min(1.0, clip[c] / norm) if norm > 0 else 1.0
      padded = np.zeros(big_d)
      padded[:d] = flat * scale / clip[c] * mechanism.rounding_shrink()
      rotated = np.clip(hadamard @ (signs * padded), -1 / np.sqrt(big_d), 1 / np.sqrt(big_d))
      want += signs * (hadamard @ rotated) * clip[c]
      bits += 0.5 if norm <= clip[c] else -0.5
    got = np.concatenate([v.ravel() for v in decoded.values[c]])
    np.testing.assert_allclose(got, want[:d], atol=1e-4 * clip[c])
    assert decoded.bits[c] == pytest.approx(bits, abs=1e-4)


def test_decode_bounds_what_a_site_can_inject():
  shapes = [(10,)]
  d = 10
  clip = {c: 0.5 for c in categories.CATEGORY_IDS}
  wild = np.full(mechanism.encoded_length(shapes), 1e6)  # A site with its own client.
  decoded = mechanism.decode_secure_sum(wild, 2, clip, shapes, 7, max_sites=3)
  for c in categories.CATEGORY_IDS:
    assert decoded.projected[c]
    assert np.linalg.norm(np.concatenate(decoded.values[c])) <= 3 * 0.5 * (1 + 1e-9)
    assert decoded.bits[c] == 1.5  # max_sites / 2, whatever the sites in the sum.
  with pytest.raises(ValueError):
    mechanism.decode_secure_sum(np.full(6 * (16 + 1), np.nan), 3, clip, shapes, 7, 3)
  with pytest.raises(ValueError, match='max_sites'):
    mechanism.decode_secure_sum(np.zeros(6 * 17), 4, clip, shapes, 7, 3)
  del d


def test_rotation_is_an_orthonormal_hadamard_rotation():
  from scipy import linalg  # pylint: disable=g-import-not-at-top
  assert [mechanism.padded_length(d) for d in (1, 2, 3, 1350, 2048)] == [1, 2, 4, 2048, 2048]
  x = np.random.default_rng(0).normal(size=100)
  rotated = mechanism.rotate(x, 5, 2)
  signs = mechanism._signs(5, 2, 128)  # pylint: disable=protected-access
  padded = np.concatenate([x, np.zeros(28)])
  np.testing.assert_allclose(rotated, linalg.hadamard(128) @ (signs * padded) / np.sqrt(128),
                             atol=1e-12)
  np.testing.assert_allclose(mechanism.unrotate(rotated, 5, 100, 2), x, atol=1e-12)
  assert not np.allclose(mechanism.rotate(x, 6, 2), rotated)  # The seed matters.


@pytest.mark.parametrize('n', [2, 5, 10])
def test_a_site_at_its_maximum_adds_no_more_than_one_clip_norm(n):
  """Anything a site can send inside Flower's range decodes to norm <= 1 clip norm (the old
  encoding: sqrt(d)); its count bit to at most one honest site's +-0.5."""
  from tff_medical.crosssilo import influence  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(n)
  d = 300
  big_d = mechanism.padded_length(d)
  for _ in range(20):
    extreme = rng.choice([-1.0, 1.0], big_d) * mechanism.CLIPPING_RANGE
    assert np.linalg.norm(mechanism.decode_unit_sum(extreme, 3, d, n)[0]) <= 1 + 1e-9
  m = influence.measure(n, d=1350, trials=5)
  assert m.before > 0.95  # The finding, reproduced on the old encoding.
  assert m.attacker_norm <= 1 + 1e-9
  # The share of the round a site at its max takes is about one honest site's at its max (the
  # honest update loses ~29% of its norm to the encoding's clip, the corner of the box does not).
  assert m.at_max <= 1.2 * m.honest_at_max
  assert m.at_max < 0.8 if n == 2 else m.at_max < 1.5 / n + 0.05
  assert m.honest_cosine > 0.9 and 0.6 < m.honest_norm < 0.8
  reach = influence.count_reach(n)
  assert reach['at_max'] == 1.0 and reach['own_client'] == n


def test_noise_on_the_secure_sum_has_the_planned_stddev():
  plan = _plan(z=2.0, m=20)
  queries = mechanism.category_queries(plan)
  states = mechanism.initial_states(queries)
  shapes = [(4000,)]
  zero = mechanism.DecodedSum({c: [np.zeros(4000, np.float32)] for c in categories.CATEGORY_IDS},
                              {c: 0.0 for c in categories.CATEGORY_IDS}, 20,
                              {c: False for c in categories.CATEGORY_IDS})
  result = mechanism.noised_round(queries, states, zero, ['HeadCT'])
  split = plan.splits['HeadCT']
  # NormalizedQuery divides by m; value noise stddev is z_v * C.
  want = split.value_noise_multiplier * 0.5 / 20
  got = float(np.std(result.update[0]))
  assert got == pytest.approx(want, rel=6 / np.sqrt(2 * 4000))
  removal, whole_client = result.events['HeadCT']
  # Calibrated so that the binding relation gets z = 2; relation (a) is then at least that.
  assert removal.noise_multiplier == pytest.approx(
      (split.value_noise_multiplier**-2 + split.clipped_count_stddev**-2)**-0.5, rel=1e-4)
  assert removal.noise_multiplier >= 2.0 * (1 - 1e-4)
  # Only HeadCT was released: a whole site moves its value and its count (by 0.5) alone.
  assert whole_client.noise_multiplier == pytest.approx(
      (split.value_noise_multiplier**-2 + (2 * split.clipped_count_stddev)**-2)**-0.5, rel=1e-4)
  assert all(result.events[c] is None for c in categories.CATEGORY_IDS if c != 'HeadCT')


def test_rate_one_accounting_is_the_plain_gaussian():
  spec = coordinator.sampling_spec(4)
  assert spec.rate == 1.0
  z, rounds, delta = 3.0, 7, 1e-5
  ours = accounting.rounds_epsilon([(z, rounds)], spec, delta)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
  assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
  halved = accounting.rounds_epsilon(
      [(z, rounds)], accounting.SamplingSpec('poisson', 8, 4), delta)
  assert halved < ours  # Amplification would only apply if sites were sampled.


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_sites=1), 'num_sites'),
    (dict(num_sites=3, threshold=1), 'threshold'),
    (dict(num_sites=3, threshold=4), 'threshold'),
    (dict(num_sites=3, eval_dataset='site_data'), 'eval_dataset'),
])
def test_deployment_refuses_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    coordinator.Deployment(pki_dir='pki', **kwargs)


def _policy(tmp_path, epsilon):
  with open(os.path.join(REPO, 'configs', 'privacy_policy.json')) as f:
    raw = json.load(f)
  for c in raw['categories']:
    c['epsilon'] = epsilon
  path = tmp_path / 'policy.json'
  path.write_text(json.dumps(raw))
  return str(path)


def _config(tmp_path, rounds=2, epsilon=1000.0):
  """Tiny model, one local step (FedSGD-like: what learns in a few rounds), weak privacy."""
  config = config_lib.base_config()
  config.policy = _policy(tmp_path, epsilon)
  config.total_rounds = rounds
  config.model.conv_filters = (8, 16)
  config.client.learning_rate = 0.3
  config.client.batch_size = 64
  config.client.local_epochs = 1
  config.server.optimizer = 'sgdm'
  config.server.learning_rate = 1.0
  config.server.momentum = 0.9
  config.clip.initial_l2_norm_clip = 1.0
  config.clip.max_count_noise_fraction = 1.0
  config.eval_every = 1
  config.checkpoints_to_keep = 5
  config.seed = 3
  return config


def _phantom_sites(n=3, per_category=10):
  from tff_medical.data import phantoms  # pylint: disable=g-import-not-at-top
  return [phantoms.generate(per_category, seed=100 + i) for i in range(n)]


@pytest.fixture(scope='module')
def in_process_run(tmp_path_factory):
  """Coordinator math + SecAgg+ in-process: 3 sites, site 3 sends NaN, 2 rounds, then resume."""
  tmp_path = tmp_path_factory.mktemp('inproc')
  config = _config(tmp_path, rounds=2)
  sites = _phantom_sites()
  workers = [site_worker.SiteWorker(images, i) for i, images in enumerate(sites[:2])]
  workers.append(site_worker.SiteWorker(sites[2], 2,
                                        tamper=site_runtime._tamper(site_runtime.Fault.NAN)))  # pylint: disable=protected-access
  apps = {101 + i: secagg.make_site_app(w.fit) for i, w in enumerate(workers)}
  deployment = coordinator.Deployment(pki_dir='unused', num_sites=3, threshold=2,
                                      eval_dataset='phantoms', eval_num_per_category=20)
  run_dir = str(tmp_path / 'run')
  drivers = []

  def driver_factory():
    drivers.append(InProcessDriver(apps))
    return drivers[-1]

  result = coordinator.run(config, deployment, run_dir, driver_factory=driver_factory)
  return dict(config=config, deployment=deployment, run_dir=run_dir, result=result,
              drivers=drivers, apps=apps, tmp_path=tmp_path)


def test_in_process_run_writes_the_run_directory_and_an_exact_ledger(in_process_run):
  result, run_dir = in_process_run['result'], in_process_run['run_dir']
  assert result.rounds_completed == 2
  for name in ('config.json', 'metrics.csv', 'audit_log.jsonl', 'privacy_ledger.json',
               'checkpoints'):
    assert os.path.exists(os.path.join(run_dir, name)), name
  with open(os.path.join(run_dir, 'privacy_ledger.json')) as f:
    ledger_json = json.load(f)
  assert {k: ledger_json['sampling'][k] for k in ('method', 'total_clients', 'rate')} == {
      'method': 'poisson', 'total_clients': 3, 'rate': 1.0}
  plan = json.load(open(os.path.join(run_dir, 'config.json')))['plan']
  delta = result.policy.delta
  for c in categories.CATEGORY_IDS:
    z = plan['noise_multipliers'][c]
    want = reference_epsilon([(1.0, z, 2)], delta)
    assert result.ledger.epsilon_spent(c) == pytest.approx(want, rel=1e-4)
  from tff_medical.monitoring import audit  # pylint: disable=g-import-not-at-top
  assert audit.verify_run_dir(run_dir).ok


def test_a_nan_site_cannot_corrupt_the_model(in_process_run):
  result = in_process_run['result']
  assert all(np.all(np.isfinite(w)) for w in result.keras_model.get_weights())
  with open(os.path.join(in_process_run['run_dir'], 'metrics.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [int(r['num_clients']) for r in rows] == [3, 3]
  assert all(np.isfinite(float(r['update_norm'])) for r in rows)
  print('in-process accuracy per round', [r.get('eval/accuracy') for r in rows])


def test_in_process_run_resumes_without_restarting_the_budget(in_process_run):
  config = copy.deepcopy(in_process_run['config'])
  config.total_rounds = 3  # The budget was calibrated for 2: a resumed run must not reset it.
  plan = json.load(open(os.path.join(in_process_run['run_dir'], 'config.json')))['plan']
  result = coordinator.run(config, in_process_run['deployment'], in_process_run['run_dir'],
                           driver_factory=lambda: InProcessDriver(in_process_run['apps']))
  assert (result.rounds_completed, result.stop_reason) == (2, 'budget_exhausted')
  for c in categories.CATEGORY_IDS:  # The run kept its calibration and its spend.
    z = plan['noise_multipliers'][c]
    assert result.ledger.epsilon_spent(c) == pytest.approx(
        reference_epsilon([(1.0, z, 2)], result.policy.delta), rel=1e-4)
    assert result.ledger.epsilon_spent(c) <= result.policy.budget(c).epsilon
  with open(os.path.join(in_process_run['run_dir'], 'audit_log.jsonl')) as f:
    assert [json.loads(line)['round'] for line in f] == [1, 2]


# Example level (privacy_unit 'example'): DP-SGD at each site, plain secure mean ----------

EXAMPLE_SIZES = (8, 10, 12)  # Images per category at the three sites: three sampling rates.
EXAMPLE_BOUND = 100.0


def _example_config(tmp_path, rounds=2):
  config = _config(tmp_path, rounds=rounds, epsilon=8.0)
  config.privacy_unit = 'example'
  config.client.batch_size = 8
  config.client.learning_rate = 0.5
  config.example_dp.local_steps = 2
  config.example_dp.update_l2_bound = EXAMPLE_BOUND
  config.server.momentum = 0.0  # Server SGD at rate 1: the new model is the sites' mean.
  return config


def _example_apps(tmp_path, calls):
  """Three restartable sites (a new SiteWorker = a restarted site process, same state)."""
  from tff_medical.data import phantoms  # pylint: disable=g-import-not-at-top
  apps = {}
  for i, size in enumerate(EXAMPLE_SIZES):
    worker = site_worker.SiteWorker(phantoms.generate(size, seed=200 + i), i,
                                    site_name=f'site-{i}',
                                    state_dir=str(tmp_path / 'state' / f'site-{i}'))

    def fit(weights, config, worker=worker, i=i):
      vector = worker.fit(weights, config)
      calls.append((i, int(config['round']), [np.array(w) for w in weights], vector,
                    int(config[site_worker.KEY_ROTATION])))
      return vector

    apps[301 + i] = secagg.make_site_app(fit, worker.report)
  return apps


def _site_state(tmp_path, i, run_dir):
  run_id = open(os.path.join(run_dir, coordinator.RUN_ID_FILE)).read().strip()
  with open(tmp_path / 'state' / f'site-{i}' / f'{run_id}.json') as f:
    return json.load(f)


class _Crash(Exception):
  pass


def _crash_after_round_1(record):
  if record['round'] == 1:
    raise _Crash()


@pytest.fixture(scope='module')
def example_run(tmp_path_factory):
  """3 sites, 2 rounds; the coordinator dies after round 1 and every site restarts, then the
  run resumes from the coordinator's checkpoint and the sites' own ledgers."""
  tmp_path = tmp_path_factory.mktemp('example')
  config = _example_config(tmp_path)
  calls = []
  deployment = coordinator.Deployment(pki_dir='unused', num_sites=3, threshold=2,
                                      eval_dataset='phantoms', eval_num_per_category=10)
  run_dir = str(tmp_path / 'run')
  apps = _example_apps(tmp_path, calls)
  with pytest.raises(_Crash):
    coordinator.run(config, deployment, run_dir, driver_factory=lambda: InProcessDriver(apps),
                    on_round=_crash_after_round_1)
  apps = _example_apps(tmp_path, calls)  # Restarted site processes.
  result = coordinator.run(config, deployment, run_dir,
                           driver_factory=lambda: InProcessDriver(apps))
  return dict(config=config, deployment=deployment, run_dir=run_dir, result=result,
              calls=calls, tmp_path=tmp_path)


def test_example_level_ledger_is_each_sites_dp_sgd_by_dp_accounting(example_run):
  from tff_medical.privacy import example_ledger  # pylint: disable=g-import-not-at-top
  result, run_dir, tmp_path = (example_run[k] for k in ('result', 'run_dir', 'tmp_path'))
  # Calibrated to spend each budget over the 2 planned rounds: all frozen after them.
  assert (result.rounds_completed, result.stop_reason) == (2, 'budget_exhausted')
  with open(os.path.join(run_dir, 'privacy_ledger.json')) as f:
    ledger_json = json.load(f)
  example_ledger.validate_example_ledger_json(ledger_json)
  assert ledger_json['privacy_unit'] == 'example'
  assert sorted(ledger_json['sites']) == ['site-0', 'site-1', 'site-2']
  steps = 2 * 2  # Rounds x local steps, every site in every round.
  delta = result.policy.delta
  for i, size in enumerate(EXAMPLE_SIZES):
    entry = ledger_json['sites'][f'site-{i}']
    rate = 8 / (6 * size)  # b / n: the site's own Poisson rate.
    assert entry['sampling']['rate'] == pytest.approx(rate, rel=1e-12)
    assert (entry['rounds_participated'], entry['steps_completed']) == (2, steps)
    own = _site_state(tmp_path, i, run_dir)  # The site's own ledger, in its own folder.
    for c in categories.CATEGORY_IDS:
      z = own['plan']['noise_multipliers'][c]
      acc = dp_accounting.rdp.RdpAccountant()
      acc.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(z)),
                  steps)
      want = acc.get_epsilon(delta)
      got = entry['categories'][c]
      assert got['steps_released'] == steps
      assert got['epsilon_spent'] == pytest.approx(want, rel=1e-4), (i, c)
      assert want <= 8.0 and got['epsilon_spent'] <= 8.0
      history = own['ledger']['example']['sites'][f'site-{i}']['history']
      assert sum(h['steps'] for h in history) == steps
  for c in categories.CATEGORY_IDS:  # The whole is the worst site.
    assert ledger_json['categories'][c]['epsilon_spent'] == pytest.approx(
        max(s['categories'][c]['epsilon_spent'] for s in ledger_json['sites'].values()))
  from tff_medical.monitoring import audit  # pylint: disable=g-import-not-at-top
  assert audit.verify_run_dir(run_dir).ok


def test_example_level_secrets_and_counts_stay_at_the_sites(example_run):
  run_dir, tmp_path = example_run['run_dir'], example_run['tmp_path']
  secrets_ = [str(_site_state(tmp_path, i, run_dir)['ledger']['sampling_secret'])
              for i in range(3)]
  for i in range(3):
    path = tmp_path / 'state' / f'site-{i}'
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in path.iterdir())
  for root, _, files in os.walk(run_dir):
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        data = f.read()
      assert not any(s.encode() in data for s in secrets_), name
      assert b'category_counts' not in data, name


def test_example_level_coordinator_adds_no_noise_to_the_mean(example_run):
  calls = example_run['calls']
  first = [c for c in calls if c[1] == 1]
  second = [c for c in calls if c[1] == 2]
  assert len(first) == 3 and len(second) == 3
  w0, w1 = first[0][2], second[0][2]
  d = sum(w.size for w in first[0][2])
  deltas = [mechanism.decode_unit_sum(vector, seed, d, 1)[0] * EXAMPLE_BOUND  # Undoes encode.
            for _, _, _, vector, seed in first]
  assert all(np.linalg.norm(d) < EXAMPLE_BOUND for d in deltas)  # not clipped
  assert np.linalg.norm(np.mean(deltas, axis=0)) > 1e-2  # the sites did move the model
  got = np.concatenate([(a - b).ravel() for a, b in zip(w0, w1)])
  # Server SGD at rate 1 applies the plain mean; quantization: bound x 2 / 2**22 a site.
  np.testing.assert_allclose(got, np.mean(deltas, axis=0),
                             atol=3 * EXAMPLE_BOUND * 2 / mechanism.QUANTIZATION_RANGE + 1e-6)


def test_example_update_encoding_bounds_each_site():
  shapes = [(3, 4), (5,)]
  small = [np.full(s, 0.01, np.float32) for s in shapes]
  encoded = mechanism.encode_site_update(small, 2.0, 9)
  mean, projected = mechanism.decode_update_sum(encoded, 1, 2.0, shapes, 9)
  assert not projected
  np.testing.assert_allclose(np.concatenate([m.ravel() for m in mean]),
                             np.concatenate([v.ravel() for v in small]), rtol=1e-5)
  huge = [np.full(s, 1e6, np.float32) for s in shapes]
  encoded = mechanism.encode_site_update(huge, 2.0, 9)
  assert np.all(np.abs(encoded) <= mechanism.CLIPPING_RANGE) and encoded.shape == (32,)
  mean, _ = mechanism.decode_update_sum(encoded, 1, 2.0, shapes, 9)
  assert np.linalg.norm(np.concatenate([m.ravel() for m in mean])) <= 2.0
  mean, projected = mechanism.decode_update_sum(np.full(32, 1e3), 2, 2.0, shapes, 9)
  assert projected and np.linalg.norm(np.concatenate([m.ravel() for m in mean])) <= (
      2.0 * (1 + 1e-6))
  with pytest.raises(ValueError, match='finite'):
    mechanism.decode_update_sum(np.full(32, np.nan), 2, 2.0, shapes, 9)


def test_example_level_resume_keeps_site_ledgers_and_freezes(example_run):
  """Planned for 2 rounds, the run now asks for 4: the sites (restarted again) resume their
  ledgers, every category is frozen at every site, nothing more is spent."""
  run_dir, tmp_path = example_run['run_dir'], example_run['tmp_path']
  before = {i: _site_state(tmp_path, i, run_dir) for i in range(3)}
  with open(os.path.join(run_dir, 'privacy_ledger.json')) as f:
    ledger_before = json.load(f)
  config = copy.deepcopy(example_run['config'])
  config.total_rounds = 4
  calls = []
  apps = _example_apps(tmp_path, calls)
  result = coordinator.run(config, example_run['deployment'], run_dir,
                           driver_factory=lambda: InProcessDriver(apps))
  assert (result.rounds_completed, result.stop_reason) == (2, 'budget_exhausted')
  assert not calls  # No site trained.
  for i in range(3):  # Their own ledgers as they were, every category frozen.
    after = _site_state(tmp_path, i, run_dir)
    assert after['ledger'] == before[i]['ledger'] and after['plan'] == before[i]['plan']
    assert set(after['ledger']['example']['sites'][f'site-{i}']['frozen']) == set(
        categories.CATEGORY_IDS)
  with open(os.path.join(run_dir, 'privacy_ledger.json')) as f:
    assert json.load(f)['sites'] == ledger_before['sites']


def test_example_level_site_that_lost_its_ledger_is_left_out(example_run, tmp_path):
  from tff_medical.data import phantoms  # pylint: disable=g-import-not-at-top
  from tff_medical.privacy import example_ledger  # pylint: disable=g-import-not-at-top
  from tff_medical.training import example_level  # pylint: disable=g-import-not-at-top
  run_dir = example_run['run_dir']
  config = coordinator._cross_silo_config(copy.deepcopy(example_run['config']),  # pylint: disable=protected-access
                                          example_run['deployment'])
  unit = coordinator._ExampleLevel(config, example_run['result'].policy, [], run_dir)  # pylint: disable=protected-access
  own = _site_state(example_run['tmp_path'], 1, run_dir)
  unit.ledger = example_level.LedgerView(example_ledger.ExampleLevelLedger.from_state(
      own['ledger']['example'], example_run['result'].policy))
  settings = site_worker.example_settings(config, example_run['result'].policy, unit.run_id)
  images = phantoms.generate(EXAMPLE_SIZES[1], seed=201)  # site-1's data, a new state folder.
  fresh = site_worker.ExampleSite(str(tmp_path), 'site-1', images.labels, settings)
  assert fresh.report().releasable == categories.CATEGORY_IDS  # Its budget would restart...
  assert 'lost its ledger' in unit._accept(fresh.report())  # ...so it is left out.  # pylint: disable=protected-access


def test_a_site_reporting_under_another_name_is_refused_and_the_ledger_untouched(tmp_path):
  """Node 301 holds site-0's certificate and key but reports as site-1 (with its own 8 images a
  category); the real site-1 (10 a category) must still be taken, with its own figures."""
  from tff_medical.data import phantoms  # pylint: disable=g-import-not-at-top
  from tff_medical.privacy import policy as policy_lib  # pylint: disable=g-import-not-at-top
  deployment = coordinator.Deployment(pki_dir='unused', num_sites=3, threshold=2)
  config = coordinator._cross_silo_config(_example_config(tmp_path), deployment)  # pylint: disable=protected-access
  run_dir = str(tmp_path / 'run')
  os.makedirs(run_dir)
  unit = coordinator._ExampleLevel(config, policy_lib.load_policy(config.policy), [], run_dir)  # pylint: disable=protected-access
  claims = {301: ('site-1', 8), 302: ('site-1', 10), 303: ('site-2', 12)}
  apps = {}
  for node, (name, size) in claims.items():
    worker = site_worker.SiteWorker(phantoms.generate(size, seed=node), node, site_name=name,
                                    state_dir=str(tmp_path / 'state' / str(node)))
    apps[node] = secagg.make_site_app(worker.fit, worker.report)
  driver = InProcessDriver(apps, sites={301: 'site-0', 302: 'site-1', 303: 'site-2'})
  prepared = unit.prepare(driver, [301, 302, 303], 1, deployment, driver.node_identities())
  assert sorted(prepared.node_ids) == [302, 303]
  example = unit.ledger.example
  assert sorted(example.sites) == ['site-1', 'site-2']
  assert example.site_spec('site-1').sampling.rate == pytest.approx(8 / (6 * 10), rel=1e-12)


def test_only_nodes_that_proved_their_key_are_counted():
  """Flower lists a node registered on a public key alone; the coordinator must not count it."""

  class Listed:
    def get_node_ids(self):
      return [1, 2, 3]

    def node_identities(self):
      return {1: 'site-a', 2: 'site-b'}  # Node 3 never passed the HMAC check.

  deployment = coordinator.Deployment(pki_dir='unused', num_sites=3, threshold=2,
                                      join_timeout=1.0, stage_timeout=0.5)
  assert coordinator._wait_for_sites(Listed(), deployment, None) == [1, 2]  # pylint: disable=protected-access


@pytest.mark.parametrize('change, message', [
    (dict(stack_client_level=True), 'stack_client_level'),
    (dict(update_l2_bound=0.0), 'update_l2_bound'),
])
def test_example_level_cross_silo_refuses_bad_settings(tmp_path, change, message):
  config = _example_config(tmp_path)
  for key, value in change.items():
    config.example_dp[key] = value
  deployment = coordinator.Deployment(pki_dir='unused', num_sites=3)
  with pytest.raises(ValueError, match=message):
    coordinator._cross_silo_config(config, deployment)  # pylint: disable=protected-access


def test_example_level_site_refuses_bad_instructions_and_reports(tmp_path):
  from tff_medical.data import phantoms  # pylint: disable=g-import-not-at-top
  images = phantoms.generate(2, seed=1)
  no_state = site_worker.SiteWorker(images, 0)
  settings = site_worker.example_settings(_example_config(tmp_path), accounting_policy(),
                                          'ab' * 8)
  query = {site_worker.KEY_QUERY: site_worker.QUERY_EXAMPLE_REPORT,
           site_worker.KEY_EXAMPLE: json.dumps(settings)}
  with pytest.raises(ValueError, match='state folder'):
    no_state.report(query)
  worker = site_worker.SiteWorker(images, 0, site_name='site-a', state_dir=str(tmp_path / 's'))
  with pytest.raises(ValueError, match='run id'):
    worker.report(dict(query, **{site_worker.KEY_EXAMPLE: json.dumps(dict(settings,
                                                                          run='../x'))}))
  with pytest.raises(ValueError, match='batch_size'):  # Larger than the site's 12 images.
    worker.report(dict(query, **{site_worker.KEY_EXAMPLE: json.dumps(dict(settings,
                                                                          batch_size=50))}))
  with pytest.raises(ValueError, match='ExampleReport'):
    site_worker.ExampleReport.from_json('{"site": "site-a"}')


def accounting_policy():
  from tff_medical.privacy import policy as policy_lib  # pylint: disable=g-import-not-at-top
  return policy_lib.default_policy()


# Real SuperLink: mutual TLS and node authentication ---------------------------------------


def _free_ports(n):
  import portpicker  # pylint: disable=g-import-not-at-top
  return [portpicker.pick_unused_port() for _ in range(n)]


@pytest.fixture(scope='module')
def pki_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('pki'))
  provisioning.provision(root, ['site-a', 'site-b', 'site-c'])
  return root


@pytest.fixture(scope='module')
def superlink(pki_dir, tmp_path_factory):
  fleet, driver = _free_ports(2)
  logs = tmp_path_factory.mktemp('superlink')
  link = transport.SuperLink(pki_dir, f'127.0.0.1:{fleet}', f'127.0.0.1:{driver}',
                             str(logs / 'superlink.log'), str(logs / 'ffs'))
  link.start()
  try:
    yield link
  finally:
    link.stop()


def _bad_credentials(pki_dir, tmp_path):
  """Folders with: an expired certificate, one from a foreign CA (both trusting our CA)."""
  now = datetime.datetime.now(datetime.timezone.utc)
  expired = str(tmp_path / 'expired')
  provisioning.issue_certificate(pki_dir, expired, 'site:expired',
                                 not_valid_before=now - datetime.timedelta(days=10),
                                 not_valid_after=now - datetime.timedelta(days=1))
  foreign_ca = str(tmp_path / 'foreign_pki')
  provisioning.create_authority(foreign_ca)
  foreign = str(tmp_path / 'foreign')
  provisioning.issue_certificate(foreign_ca, foreign, 'site:foreign')
  with open(os.path.join(pki_dir, 'ca', 'ca.pem'), 'rb') as f:
    (tmp_path / 'foreign' / 'ca.pem').write_bytes(f.read())
  return {'expired': expired, 'foreign': foreign}


def _tls_ready(address, credentials, timeout=5.0):
  import grpc  # pylint: disable=g-import-not-at-top
  channel = grpc.secure_channel(address, credentials)
  try:
    grpc.channel_ready_future(channel).result(timeout=timeout)
    return True
  except grpc.FutureTimeoutError:
    return False
  finally:
    channel.close()


@pytest.mark.slow  # End-to-end tier: a real SuperLink process.
def test_superlink_refuses_missing_expired_and_foreign_certificates(superlink, pki_dir,
                                                                    tmp_path):
  import grpc  # pylint: disable=g-import-not-at-top
  address = superlink.fleet_address
  site = provisioning.site_dir(pki_dir, 'site-a')
  assert _tls_ready(address, transport.channel_credentials(site))
  # A refused handshake never becomes ready; a good one does in milliseconds on loopback.
  for folder in _bad_credentials(pki_dir, tmp_path).values():
    assert not _tls_ready(address, transport.channel_credentials(folder), timeout=2.0)
  with open(os.path.join(site, 'ca.pem'), 'rb') as f:  # No client certificate at all.
    assert not _tls_ready(address, grpc.ssl_channel_credentials(f.read()), timeout=2.0)


def _create_node(address, site_folder, keys, during=None):
  """Flower's own Fleet connection (as a SuperNode opens it): registers, returns the node id.
  `during(conn, node_id)` runs while the node is registered."""
  import grpc  # pylint: disable=g-import-not-at-top
  from flwr.client.grpc_rere_client import connection  # pylint: disable=g-import-not-at-top
  from flwr.common.retry_invoker import RetryInvoker, exponential  # pylint: disable=g-import-not-at-top
  original = connection.create_channel
  transport.present_client_certificate(site_folder)
  try:
    invoker = RetryInvoker(exponential, grpc.RpcError, max_tries=1, max_time=10)
    outcome = {}
    with connection.grpc_request_response(address, False, invoker,
                                          root_certificates=b'unused',
                                          authentication_keys=keys) as conn:
      try:  # Flower's context manager logs and swallows what is raised inside it.
        outcome['node_id'] = conn[2]()
        if during is not None:
          during(conn, outcome['node_id'])
        conn[3]()  # delete_node
      except Exception as e:  # pylint: disable=broad-except
        outcome['error'] = e
    if 'error' in outcome:
      raise outcome['error']
    return outcome['node_id']
  finally:
    connection.create_channel = original


@pytest.mark.slow  # End-to-end tier: a real SuperLink process.
def test_only_enrolled_node_keys_join(superlink, pki_dir, tmp_path):
  import grpc  # pylint: disable=g-import-not-at-top
  site = provisioning.site_dir(pki_dir, 'site-b')
  keys = (provisioning.load_private_key(os.path.join(site, 'auth_key')),
          provisioning.load_public_key(os.path.join(site, 'auth_key.pub')))
  assert _create_node(superlink.fleet_address, site, keys) > 0
  stranger = str(tmp_path / 'stranger')
  provisioning.write_auth_keys(stranger)  # A valid certificate, but a key nobody enrolled.
  stranger_keys = (provisioning.load_private_key(os.path.join(stranger, 'auth_key')),
                   provisioning.load_public_key(os.path.join(stranger, 'auth_key.pub')))
  try:
    node_id = _create_node(superlink.fleet_address, site, stranger_keys)
  except grpc.RpcError as e:  # Refused: Flower's interceptor answers UNAUTHENTICATED.
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
  else:
    assert not node_id, f'an unenrolled key was given node {node_id}'


def _watch_private_files(root):
  """Checks `root` before every file-system call this process makes (an audit hook sees each
  open, chmod, rename, mkdir before it runs), so every state between two calls is observed:
  a file holding a private key, or its folder, readable by group or others at any moment is
  recorded as (event, path, mode). Returns (exposures, stop)."""
  exposures, state = [], {'on': True, 'busy': False}
  marker = b'PRIVATE KEY'

  def check(event):
    for folder, _, names in os.walk(root):
      for name in names:
        path = os.path.join(folder, name)
        try:
          with open(path, 'rb') as f:
            if marker not in f.read():
              continue
          modes = {path: os.stat(path).st_mode, folder: os.stat(folder).st_mode}
        except OSError:
          continue  # Renamed away between the walk and the read.
        exposures.extend((event, p, oct(m & 0o777)) for p, m in modes.items() if m & 0o077)

  def hook(event, args):
    del args
    if not state['on'] or state['busy'] or not (event == 'open' or event.startswith('os.')):
      return
    state['busy'] = True
    try:
      check(event)
    finally:
      state['busy'] = False

  sys.addaudithook(hook)  # Cannot be removed: `stop` turns it off.
  return exposures, lambda: state.update(on=False)


def test_no_private_key_is_readable_at_any_moment_of_provisioning(tmp_path):
  root = str(tmp_path / 'pki')
  exposures, stop = _watch_private_files(root)
  try:
    provisioning.provision(root, ['site-a', 'site-b'])
    provisioning.enroll_site(root, 'site-c')
  finally:
    stop()
  assert not exposures, exposures[:5]
  keys = ['ca/ca.key', 'coordinator/key.pem', 'coordinator/auth_key'] + [
      f'sites/{s}/{k}' for s in ('site-a', 'site-b', 'site-c') for k in ('key.pem', 'auth_key')]
  for name in keys:
    path = os.path.join(root, name)
    assert os.stat(path).st_mode & 0o777 == 0o600, name
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700, name
  assert os.stat(root).st_mode & 0o777 == 0o700


def _keys(folder, private_from=None):
  return (provisioning.load_private_key(os.path.join(private_from or folder, 'auth_key')),
          provisioning.load_public_key(os.path.join(folder, 'auth_key.pub')))


@pytest.mark.slow  # End-to-end tier: a real SuperLink process.
def test_node_identity_comes_from_the_certificate_and_a_proven_key(superlink, pki_dir,
                                                                   tmp_path):
  import grpc  # pylint: disable=g-import-not-at-top
  site_a = provisioning.site_dir(pki_dir, 'site-a')
  # site-c: no other test registers it (Flower 1.12 keeps a deleted node's id for its key).
  site_c = provisioning.site_dir(pki_dir, 'site-c')
  seen = {}

  def pull(conn, node_id):
    conn[0]()  # PullTaskIns: HMAC-checked, proves the private key.
    seen[node_id] = superlink.identities().get(node_id)

  node = _create_node(superlink.fleet_address, site_c, _keys(site_c), during=pull)
  assert seen == {node: 'site-c'}
  # site-a's certificate with site-c's (whole) key pair: refused before Flower registers it.
  with pytest.raises(grpc.RpcError) as refused:
    _create_node(superlink.fleet_address, site_a, _keys(site_c))
  assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
  # site-c's public key without its private key: Flower 1.12 registers the node, but it never
  # proves the key, so the coordinator does not count it.
  stranger = str(tmp_path / 'stranger')
  provisioning.write_auth_keys(stranger)
  impostor = {}

  def pull_unproven(conn, node_id):
    with pytest.raises(grpc.RpcError):
      conn[0]()
    impostor[node_id] = node_id in superlink.identities()

  with pytest.raises(grpc.RpcError):  # delete_node is HMAC-checked too.
    _create_node(superlink.fleet_address, site_c, _keys(site_c, private_from=stranger),
                 during=pull_unproven)
  assert impostor and not any(impostor.values())


@pytest.mark.slow  # End-to-end tier: a real SuperLink process.
def test_driver_api_is_for_the_coordinator_only(superlink, pki_dir):
  import grpc  # pylint: disable=g-import-not-at-top
  from flwr.proto.driver_pb2_grpc import DriverStub  # pylint: disable=g-import-not-at-top
  from flwr.proto.run_pb2 import CreateRunRequest  # pylint: disable=g-import-not-at-top
  driver = transport.make_driver(os.path.join(pki_dir, 'coordinator'), superlink.driver_address)
  assert transport.create_run(driver) != 0
  channel = grpc.secure_channel(superlink.driver_address, transport.channel_credentials(
      provisioning.site_dir(pki_dir, 'site-a')))
  try:
    with pytest.raises(grpc.RpcError) as refused:
      DriverStub(channel).CreateRun(CreateRunRequest(fab_id='x', fab_version='1'))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
  finally:
    channel.close()


def test_provisioning_writes_private_keys_owner_only(pki_dir):
  for name in ('ca/ca.key', 'coordinator/key.pem', 'coordinator/auth_key',
               'sites/site-a/key.pem', 'sites/site-a/auth_key'):
    assert os.stat(os.path.join(pki_dir, name)).st_mode & 0o077 == 0, name
  with open(os.path.join(pki_dir, 'coordinator', 'enrolled_sites.csv')) as f:
    assert len([line for line in f if line.strip()]) == 3
  with pytest.raises(ValueError, match='site name'):
    provisioning.enroll_site(pki_dir, '../evil')


# End to end: coordinator and site processes on loopback -----------------------------------


def _spawn(args, log_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', FLWR_TELEMETRY_ENABLED='0',
             PYTHONPATH=REPO)
  log = open(log_path, 'wb')  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable] + args, cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process):
  if process.poll() is None:
    os.killpg(process.pid, signal.SIGKILL)
  process.wait(timeout=30)


def _tff_workers(sessions):
  """PIDs of TFF C++ workers started in `sessions` (there must be none: no side starts one)."""
  pids = []
  for pid in os.listdir('/proc'):
    if pid.isdigit():
      try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
          command = f.read()
        with open(f'/proc/{pid}/stat') as f:
          session = int(f.read().rsplit(')', 1)[1].split()[4])
      except (OSError, ValueError, IndexError):
        continue
      if b'worker_binary' in command and session in sessions:
        pids.append(int(pid))
  return pids


@pytest.mark.slow
def test_coordinator_and_three_sites_on_loopback(pki_dir, tmp_path):
  """3 sites (own phantom data each); site-c dies in round 3 (the round completes with 2),
  site-b dies in round 5 (1 left < threshold 2: abandoned, nothing spent); a 4th process with an
  expired certificate is refused. Checks model, ledger, masking and the run directory."""
  from tff_medical.training import evaluation, program  # pylint: disable=g-import-not-at-top
  config_path = tmp_path / 'config.py'
  policy = _policy(tmp_path, 1000.0)
  config_path.write_text(
      'import sys\n'
      f'sys.path.insert(0, {os.path.join(REPO, "tests")!r})\n'
      'def get_config():\n'
      '  import pathlib, test_crosssilo\n'
      f'  config = test_crosssilo._config(pathlib.Path({str(tmp_path)!r}), rounds=6)\n'
      f'  config.policy = {policy!r}\n'
      '  return config\n')
  fleet, driver = _free_ports(2)
  bad = _bad_credentials(pki_dir, tmp_path)
  for name in ('auth_key', 'auth_key.pub'):  # Enrolled key, expired certificate.
    with open(os.path.join(pki_dir, 'sites', 'site-a', name), 'rb') as f:
      (tmp_path / 'expired' / name).write_bytes(f.read())
  root = tmp_path / 'runs'
  address = f'127.0.0.1:{fleet}'
  processes = []
  try:
    processes.append(_spawn([
        'experiments/coordinator.py', f'--config={config_path}', f'--pki_dir={pki_dir}',
        '--num_sites=3', '--threshold=2', f'--fleet_port={fleet}', f'--driver_port={driver}',
        '--stage_timeout=15', '--train_timeout=240', '--join_timeout=240',
        '--max_abandoned_rounds=1', '--eval_dataset=phantoms', '--eval_num_per_category=30',
        f'--root_output_dir={root}', '--experiment_name=e2e'], tmp_path / 'coordinator.log'))
    faults = {'site-a': [], 'site-b': ['--fault=crash', '--fault_round=5'],
              'site-c': ['--fault=crash', '--fault_round=3']}
    for i, (site, fault) in enumerate(faults.items()):
      processes.append(_spawn([
          'experiments/site.py', f'--site_dir={os.path.join(pki_dir, "sites", site)}',
          f'--coordinator={address}', '--dataset=phantoms', '--num_per_category=10',
          f'--seed={100 + i}', '--max_wait_seconds=30'] + fault, tmp_path / f'{site}.log'))
    refused = _spawn(['experiments/site.py', f'--site_dir={bad["expired"]}',
                      f'--coordinator={address}', '--dataset=phantoms',
                      '--num_per_category=2', '--max_wait_seconds=20'],
                     tmp_path / 'refused.log')
    processes.append(refused)
    coordinator_process = processes[0]
    coordinator_process.wait(timeout=900)
    logs = {p.name: p.read_text(errors='replace') for p in tmp_path.glob('*.log')}
    assert coordinator_process.returncode == 0, logs['coordinator.log'][-5000:]
    assert refused.wait(timeout=120) == 2, logs['refused.log'][-3000:]
    assert processes[2].wait(timeout=120) == 17 and processes[3].wait(timeout=60) == 17
    assert processes[1].wait(timeout=120) == 0, logs['site-a.log'][-3000:]
    assert not _tff_workers({p.pid for p in processes})
  finally:
    for process in processes:
      _stop(process)
  run_dir = root / 'e2e'
  with open(run_dir / 'metrics.csv') as f:
    rows = list(csv.DictReader(f))
  # Rounds 1-2 with 3 sites, 3-4 with the survivors, round 5 abandoned and not released.
  assert [int(r['num_clients']) for r in rows] == [3, 3, 2, 2]
  ledger_json = json.loads((run_dir / 'privacy_ledger.json').read_text())
  assert ledger_json['rounds_completed'] == 4
  plan = json.loads((run_dir / 'config.json').read_text())['plan']
  delta = ledger_json['delta']
  for c in categories.CATEGORY_IDS:
    want = reference_epsilon([(1.0, plan['noise_multipliers'][c], 4)], delta)
    assert ledger_json['categories'][c]['epsilon_spent'] == pytest.approx(want, rel=1e-4)
  # The model improves on the coordinator's own evaluation set. Per-category sub-updates on a
  # few dozen images learn slowly and unstably (as in the simulation): in 4 rounds the eval loss
  # drops (~0.07 measured) before accuracy moves, so the best released round's loss is compared
  # with the initial model's.
  config = _config(tmp_path, rounds=6)
  initial = program.build_keras_model(config)
  from tff_medical.data import client_data, phantoms  # pylint: disable=g-import-not-at-top
  images = phantoms.generate(30, seed=config.seed, stream=phantoms.TEST_STREAM)
  before = evaluation.evaluate(initial, client_data.central_dataset(images,
                                                                    np.arange(len(images))))
  loss = [float(r['eval/loss']) for r in rows]
  assert min(loss) < before['loss'] - 0.03, (before['loss'], loss)
  assert all(np.isfinite(loss))
  for name in ('audit_log.jsonl', 'dashboard.html', 'saved_model', 'model_card.json',
               'superlink.log'):
    assert (run_dir / name).exists(), name
  from tff_medical.monitoring import audit  # pylint: disable=g-import-not-at-top
  assert audit.verify_run_dir(str(run_dir)).ok
  # The sites' images trained it, whatever the coordinator evaluates on: never called synthetic.
  card = json.loads((run_dir / 'model_card.json').read_text())
  assert card['synthetic_training_data'] is not True and card.get('serving_warning') is None
