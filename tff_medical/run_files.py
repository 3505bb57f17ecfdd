"""The files of a run directory, and which of them may be published.

The release boundary (README "What is private, and from whom"): the privacy guarantee covers what
is PUBLISHABLE; CONFIDENTIAL files stay with the data custodian. Publishing a confidential file
breaks the guarantee as accounted: participant lists void the sampling amplification, the
manifest holds per-client counts, checkpoints hold the sampler's secret.
Every name a run directory can hold is listed here; anything else is confidential by default.
"""

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.csv'
AUDIT_FILE = 'audit_log.jsonl'
TENSORBOARD_DIR = 'tensorboard'
MANIFEST_FILE = 'partition_manifest.json'
CHECKPOINT_DIR = 'checkpoints'
LEDGER_FILE = 'privacy_ledger.json'
CLIENT_LEDGER_FILE = 'privacy_ledger_client.json'  # Example level with stacked client noise.
SAVED_MODEL_DIR = 'saved_model'
MODEL_CARD_FILE = 'model_card.json'
DASHBOARD_FILE = 'dashboard.html'  # The custodian's page: audit records, participants.
EMPIRICAL_AUDIT_FILE = 'empirical_audit.json'
AUDIT_CANARIES_FILE = 'audit_canaries.npz'  # An audit run's canary statistics, for resume.

# May leave the custodian: the model, its card, the ledgers and the evaluation metrics.
# metrics.csv holds no per-round timing and no client ids (training/program.py writes only
# accounted or post-processed values there); the public dashboard is rendered anew by the
# release command, never copied.
PUBLISHABLE = frozenset({
    SAVED_MODEL_DIR, MODEL_CARD_FILE, LEDGER_FILE, CLIENT_LEDGER_FILE, METRICS_FILE,
    EMPIRICAL_AUDIT_FILE,
})

# Stays with the custodian, written owner-only (0600 files, 0700 folders).
CONFIDENTIAL = frozenset({
    CONFIG_FILE,  # data paths, the data report's per-category counts
    AUDIT_FILE,  # participants of every round
    MANIFEST_FILE,  # per-client example ids and counts
    CHECKPOINT_DIR,  # the sampler's secret, full training state
    TENSORBOARD_DIR,  # round timing
    DASHBOARD_FILE,  # audit records and participation by client
    AUDIT_CANARIES_FILE,  # per-canary statistics of an audit run (its sampling, like a checkpoint)
})


def is_publishable(name: str) -> bool:
  """Whether the top-level run-directory entry `name` may be published (default: no)."""
  return name in PUBLISHABLE


# Why each confidential entry stays with the custodian, for refusals that say why.
CONFIDENTIAL_REASONS = {
    CONFIG_FILE: 'it holds data paths and the per-category counts of the data report',
    AUDIT_FILE: ('it names the participants of every round; publishing them voids the sampling '
                 'amplification the ledger assumes'),
    MANIFEST_FILE: 'it holds every client\'s example ids and per-category counts',
    CHECKPOINT_DIR: 'it holds the sampler\'s secret and the full training state',
    TENSORBOARD_DIR: 'it holds per-round timing, which depends on the sampled clients\' data',
    DASHBOARD_FILE: ('it shows audit records and participation by client; the release command '
                     'renders a public dashboard instead'),
    AUDIT_CANARIES_FILE: ('it holds each canary\'s statistics round by round, working state of '
                          'an audit run like a checkpoint; empirical_audit.json is the result'),
}

# What the release command adds to a bundle (never present in a run directory).
PUBLIC_DASHBOARD_FILE = 'public_dashboard.html'
BUNDLE_MANIFEST_FILE = 'MANIFEST.json'

# The metrics.csv columns that may be published: accounted values (epsilon, adaptive clip norms
# from the noised clipped counts, released flags from the ledger), post-processing of released
# models (update norm between two published models, evaluation of a released model on the
# custodian's test split). Never per-round timing, never anything naming a client, and not the
# exact number of clients a round: a Poisson sample's size moves by one with a whole client and
# is not in the accountant (the expected number is public, in the ledger). A column not listed
# here is dropped from a release.
PUBLISHABLE_METRIC_COLUMNS = frozenset({
    'round', 'client_level_epsilon', 'example_level_epsilon', 'update_norm',
})
PUBLISHABLE_METRIC_PREFIXES = ('eval/', 'epsilon/', 'clip_norm/', 'released/')


def is_publishable_metric(column: str) -> bool:
  """Whether the metrics.csv column `column` may be published (default: no)."""
  return column in PUBLISHABLE_METRIC_COLUMNS or (
      column.startswith(PUBLISHABLE_METRIC_PREFIXES) and
      not column.endswith(PUBLISHABLE_METRIC_PREFIXES))
