"""Benchmarks: the time of a training round, ours against plain Keras and TFF's own rounds."""

from tff_medical.benchmarks.round_time import Contender
from tff_medical.benchmarks.round_time import DEFAULT_SETTINGS
from tff_medical.benchmarks.round_time import machine_info
from tff_medical.benchmarks.round_time import run_benchmark
from tff_medical.benchmarks.round_time import run_setting
from tff_medical.benchmarks.round_time import Setting
from tff_medical.benchmarks.report import render_markdown
