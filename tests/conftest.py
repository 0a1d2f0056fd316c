"""Test-session setup: eight simulated CPU devices (for the sharding tests) and the CPU platform only.

Both must be set before JAX starts its backends, hence here, at collection time."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
