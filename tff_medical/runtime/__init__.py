"""Process-level runtime: TFF's worker reachable only by this process, tied to our lifetime."""

from tff_medical.runtime.worker import current_worker
from tff_medical.runtime.worker import install_execution_context
from tff_medical.runtime.worker import LocalWorker
from tff_medical.runtime.worker import shutdown
