"""Experiment configuration: the fields, their defaults, and the checks that refuse bad ones."""

import math

import ml_collections

from tff_medical.data import pacs
from tff_medical.data import phantoms
from tff_medical.data import sources
from tff_medical.errors import ConfigError
from tff_medical.models import cnn
from tff_medical.privacy import accounting

DATASETS = sources.NAMES
PARTITIONS = ('iid', 'dirichlet')
ACCOUNTANTS = ('rdp', 'pld')
SAMPLINGS = ('poisson', 'fixed_size')
SERVER_OPTIMIZERS = ('sgdm', 'adam')
# client: class-aware DP-FedAvg protects a whole client; example: DP-SGD inside each site
# protects each example (tff_medical.training.dp_sgd).
PRIVACY_UNITS = ('client', 'example')
# tff_medical.privacy.shared_noise_calibration.NoiseMechanism values.
DP_MECHANISMS = ('per_category_noise', 'shared_noise')


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults; configs/*.py start from this."""
  config = ml_collections.ConfigDict()
  # Data.
  config.dataset = 'phantoms'
  config.data_dir = ''  # mednist: folder or MedNIST.tar.gz; dicom: folder of DICOM files.
  config.num_per_category = 1000  # phantoms only.
  config.phantom_difficulty = phantoms.DEFAULT_DIFFICULTY  # phantoms only: see generate().
  config.num_clients = 1000
  config.partition = 'iid'
  config.dirichlet_alpha = 0.5
  config.size_skew = 0.0
  config.test_fraction = 0.1
  config.holdout_fraction = 0.1
  config.seed = 0
  # pacs only: the PACS to query (DICOMweb or DIMSE), its credentials or AE titles, the query
  # filter and the site's cache of decoded images (tff_medical.data.pacs.PacsSettings documents
  # each field).
  config.pacs = ml_collections.ConfigDict(pacs.default_config_fields())
  # Rounds and sampling.
  config.clients_per_round = 100  # Expected clients per round (Poisson) or exact (fixed_size).
  config.total_rounds = 50
  config.sampling = 'poisson'
  # Privacy.
  config.dp = True
  # dp false on real data (mednist, dicom) releases a non-private model of those images: say so
  # here. The budget registry then refuses DP runs on the same images (nothing composes with it).
  config.release_non_private = False
  # Where the per-dataset budget registry lives ('' : $TFF_MEDICAL_BUDGET_REGISTRY or
  # ~/.local/share/tff_medical/budget_registry). Keep it with the data custodian.
  config.budget_registry_dir = ''
  config.accountant = 'rdp'
  # per_category_noise: one Gaussian per category (class_aware.ClassAwareFactory.dp);
  # shared_noise: per-category clips under one Gaussian (IDP-SGD "Scale",
  # tff_medical.aggregation.shared_noise). Same per-category budgets either way.
  config.dp_mechanism = 'per_category_noise'
  config.policy = ''  # Path of a policy JSON; empty: configs/privacy_policy.json.
  config.privacy_unit = 'client'
  # privacy_unit 'example' only: each site (client) runs DP-SGD on Poisson batches of expected
  # size client.batch_size; per-category clip norms under one noise draw (dp_sgd).
  config.example_dp = ml_collections.ConfigDict()
  config.example_dp.l2_norm_clip = 1.0
  config.example_dp.local_steps = 10  # DP-SGD steps per site and round.
  # Also add client-level noise on the server (both guarantees, both ledgers kept).
  config.example_dp.stack_client_level = False
  # Cross-silo only: L2 bound of a site's round update (its DP-SGD model delta) in the secure
  # sum. Each site clips its delta to it before quantizing (post-processing: no privacy cost);
  # the coordinator bounds the sum to sites x bound. Quantization step: bound x 2 / 2**22.
  config.example_dp.update_l2_bound = 10.0
  config.clip = ml_collections.ConfigDict()
  config.clip.initial_l2_norm_clip = 0.1
  config.clip.target_unclipped_quantile = 0.5
  config.clip.learning_rate = 0.2
  config.clip.max_value_noise_inflation = 1.05
  # Largest clipped-count noise stddev, as a fraction of clients per round, before a setting is
  # refused: beyond it the adaptive clip norm would follow noise rather than the update norms.
  config.clip.max_count_noise_fraction = 0.1
  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.conv_filters = (16, 32)
  config.model.dense_units = 0
  config.model.input_pooling = 1  # Average-pool the 64x64 input by this factor first.
  config.model.head = 'gap'  # 'gap' or 'flatten' (see tff_medical.models.cnn).
  # Client and server optimizers.
  config.client = ml_collections.ConfigDict()
  config.client.learning_rate = 0.05
  config.client.batch_size = 16
  config.client.local_epochs = 1
  config.server = ml_collections.ConfigDict()
  config.server.optimizer = 'sgdm'
  config.server.learning_rate = 1.0
  config.server.momentum = 0.9
  # Empirical privacy audit (tff_medical.training.canaries, docs/PRIVACY_AUDIT.md): canary
  # clients per category, measured after training. Off by default: an audit run's model carries
  # its canaries and is never exported as deployable.
  config.audit = ml_collections.ConfigDict()
  config.audit.enabled = False
  # Inserted; as many never-inserted for the null. 2,000: docs/PRIVACY_AUDIT.md, "Why this many".
  config.audit.canaries_per_category = 2000
  config.audit.canary_norm_multiple = 2.0  # Canary norm / the category's clip norm (> 1).
  config.audit.confidence = 0.95  # Of the bootstrap interval of each empirical epsilon.
  config.audit.bootstrap = 200  # Resamples of the canaries for that interval.
  # privacy_unit 'example': the site whose canary examples are audited ('' = the first site).
  config.audit.example_site = ''
  # Outputs.
  config.eval_every = 5
  config.checkpoints_to_keep = 3
  config.export = True
  return config


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _positive_int(name: str, value) -> None:
  _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f'{name} must be a positive integer. Found {value!r}.')


def _fraction(name: str, value, upper_inclusive: bool = False) -> None:
  ok = isinstance(value, (int, float)) and 0 <= value and (
      value <= 1 if upper_inclusive else value < 1)
  _require(ok, f'{name} must be in [0, 1{"]" if upper_inclusive else ")"}. Found {value!r}.')


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses unknown choices, out-of-range values and contradictory settings."""
  needs_data_dir = sources.get(config.dataset).needs_data_dir
  _require(not needs_data_dir or bool(config.data_dir),
           f'data_dir must be set for dataset {config.dataset!r}. Found {config.data_dir!r}.')
  _require(needs_data_dir or not config.data_dir,
           f'data_dir must be empty for dataset {config.dataset!r} (the embedded data is '
           f'generated). Found {config.data_dir!r}.')
  if sources.get(config.dataset).remote:
    pacs.PacsSettings.from_config(config.get('pacs'))
  for name in ('num_per_category', 'num_clients', 'clients_per_round', 'total_rounds',
               'eval_every', 'checkpoints_to_keep'):
    _positive_int(name, config[name])
  _positive_int('client.batch_size', config.client.batch_size)
  _positive_int('client.local_epochs', config.client.local_epochs)
  _require(config.clients_per_round <= config.num_clients,
           f'clients_per_round must be at most num_clients ({config.num_clients}). '
           f'Found {config.clients_per_round}.')
  _require(config.partition in PARTITIONS,
           f'partition must be one of {", ".join(PARTITIONS)}. Found {config.partition!r}.')
  _require(config.partition != 'dirichlet' or (
      isinstance(config.dirichlet_alpha, (int, float)) and config.dirichlet_alpha > 0),
           f'dirichlet_alpha must be positive. Found {config.dirichlet_alpha!r}.')
  _require(isinstance(config.size_skew, (int, float)) and config.size_skew >= 0,
           f'size_skew must be non-negative. Found {config.size_skew!r}.')
  _fraction('test_fraction', config.test_fraction)
  difficulty = config.get('phantom_difficulty', phantoms.DEFAULT_DIFFICULTY)
  _require(isinstance(difficulty, (int, float)) and not isinstance(difficulty, bool) and
           0 <= difficulty <= 1,
           f'phantom_difficulty must be in [0, 1]. Found {difficulty!r}.')
  _fraction('holdout_fraction', config.holdout_fraction)
  _require(config.sampling in SAMPLINGS,
           f'sampling must be one of {", ".join(SAMPLINGS)}. Found {config.sampling!r}.')
  _require(config.accountant in ACCOUNTANTS,
           f'accountant must be one of {", ".join(ACCOUNTANTS)}. Found {config.accountant!r}.')
  _require(not config.dp or
           accounting.sampling_accountant_problem(config.sampling, config.accountant) is None,
           f'accountant must be \'rdp\' with sampling \'fixed_size\' '
           f'({accounting.FIXED_SIZE_NEEDS_RDP}). Found {config.accountant!r}.')
  _require(isinstance(config.dp, bool), f'dp must be true or false. Found {config.dp!r}.')
  release_non_private = config.get('release_non_private', False)
  _require(isinstance(release_non_private, bool),
           f'release_non_private must be true or false. Found {release_non_private!r}.')
  privacy_unit = config.get('privacy_unit', 'client')
  _require(privacy_unit in PRIVACY_UNITS,
           f'privacy_unit must be one of {", ".join(PRIVACY_UNITS)}. Found {privacy_unit!r}.')
  if privacy_unit == 'example':
    _require(config.dp is True, 'dp must be true with privacy_unit \'example\' (dp false '
             'trains without any privacy). Found False.')
    example = config.example_dp
    _require(isinstance(example.l2_norm_clip, (int, float)) and
             not isinstance(example.l2_norm_clip, bool) and math.isfinite(example.l2_norm_clip)
             and example.l2_norm_clip > 0,
             f'example_dp.l2_norm_clip must be positive. Found {example.l2_norm_clip!r}.')
    _positive_int('example_dp.local_steps', example.local_steps)
    bound = example.get('update_l2_bound', 10.0)
    _require(isinstance(bound, (int, float)) and not isinstance(bound, bool) and
             math.isfinite(bound) and bound > 0,
             f'example_dp.update_l2_bound must be positive. Found {bound!r}.')
    _require(isinstance(example.stack_client_level, bool),
             'example_dp.stack_client_level must be true or false. '
             f'Found {example.stack_client_level!r}.')
  _require(config.get('dp_mechanism', DP_MECHANISMS[0]) in DP_MECHANISMS,
           f'dp_mechanism must be one of {", ".join(DP_MECHANISMS)}. '
           f'Found {config.get("dp_mechanism")!r}.')
  _require(config.server.optimizer in SERVER_OPTIMIZERS,
           f'server.optimizer must be one of {", ".join(SERVER_OPTIMIZERS)}. '
           f'Found {config.server.optimizer!r}.')
  for name, value in (('client.learning_rate', config.client.learning_rate),
                      ('server.learning_rate', config.server.learning_rate),
                      ('clip.initial_l2_norm_clip', config.clip.initial_l2_norm_clip)):
    _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
             f'{name} must be positive. Found {value!r}.')
  _fraction('server.momentum', config.server.momentum)
  _fraction('clip.target_unclipped_quantile', config.clip.target_unclipped_quantile,
            upper_inclusive=True)
  _require(config.clip.max_value_noise_inflation > 1.0,
           'clip.max_value_noise_inflation must be above 1. '
           f'Found {config.clip.max_value_noise_inflation!r}.')
  _require(0 < config.clip.max_count_noise_fraction <= 1,
           'clip.max_count_noise_fraction must be in (0, 1]. '
           f'Found {config.clip.max_count_noise_fraction!r}.')
  _require(len(config.model.conv_filters) > 0 and all(
      isinstance(f, int) and f > 0 for f in config.model.conv_filters),
           f'model.conv_filters must be positive integers. Found {config.model.conv_filters!r}.')
  _validate_audit(config)
  input_pooling = config.model.get('input_pooling', 1)
  _require(input_pooling in (1, 2, 4, 8),
           f'model.input_pooling must be 1, 2, 4 or 8. Found {input_pooling!r}.')
  _require(config.model.get('head', 'gap') in cnn.HEADS,
           f'model.head must be one of {", ".join(cnn.HEADS)}. '
           f'Found {config.model.get("head")!r}.')


def _validate_audit(config: ml_collections.ConfigDict) -> None:
  audit = config.get('audit')
  if audit is None:
    return  # A config.json from before the audit existed.
  _require(isinstance(audit.get('enabled', False), bool),
           f'audit.enabled must be true or false. Found {audit.get("enabled")!r}.')
  if not audit.get('enabled', False):
    return
  _require(config.dp is True, 'audit.enabled needs dp true (the audit checks the DP '
           'mechanism\'s claim). Found dp False.')
  if config.get('privacy_unit', 'client') == 'example':
    # The site audit reads the site's own release; a stacked client-level mechanism is audited
    # by a client-level run.
    _require(not config.example_dp.get('stack_client_level', False),
             'audit.enabled with privacy_unit \'example\' needs example_dp.stack_client_level '
             'false. Found true.')
    site = audit.get('example_site', '')
    _require(isinstance(site, str), f'audit.example_site must be a site id or empty. '
             f'Found {site!r}.')
  _require(config.get('dp_mechanism', DP_MECHANISMS[0]) == 'per_category_noise',
           'audit.enabled needs dp_mechanism \'per_category_noise\'. '
           f'Found {config.get("dp_mechanism")!r}.')
  _require(config.sampling == 'poisson', 'audit.enabled needs sampling \'poisson\' (canaries are '
           f'sampled like clients, independently). Found {config.sampling!r}.')
  count = audit.get('canaries_per_category')
  _positive_int('audit.canaries_per_category', count)
  _require(count >= 10, f'audit.canaries_per_category must be at least 10. Found {count!r}.')
  multiple = audit.get('canary_norm_multiple')
  _require(isinstance(multiple, (int, float)) and not isinstance(multiple, bool) and
           math.isfinite(multiple) and multiple > 1,
           f'audit.canary_norm_multiple must be above 1 (canaries above the clip norm). '
           f'Found {multiple!r}.')
  confidence = audit.get('confidence')
  _require(isinstance(confidence, float) and 0 < confidence < 1,
           f'audit.confidence must be in (0, 1). Found {confidence!r}.')
  bootstrap = audit.get('bootstrap')
  _positive_int('audit.bootstrap', bootstrap)
  _require(bootstrap >= 50, f'audit.bootstrap must be at least 50. Found {bootstrap!r}.')
