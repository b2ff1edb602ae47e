"""spar pipeline: data, storage, distribution (Ray) and tracking (MLflow) around the pure ``spar_core``."""

import os as _os

# Ray reads this when it is imported: under `uv run`, its uv runtime-env hook would otherwise make every worker
# rebuild the environment. The workers share the driver's environment instead.
_os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
