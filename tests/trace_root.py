"""Where the tests look for a local copy of the TRACE data: $JAXCOLLAB_TRACE_ROOT, else `shared/data/trace`
beside the checkout (the CI layout). The tests that read real TRACE files skip when it is absent."""

import os
from pathlib import Path

TRACE_ROOT = Path(os.environ.get("JAXCOLLAB_TRACE_ROOT")
                  or Path(__file__).resolve().parents[2] / "shared" / "data" / "trace")
