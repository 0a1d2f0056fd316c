"""Test-session setup: eight simulated CPU devices (for the sharding tests), the CPU platform only, XLA:CPU's
backend at -O1, and one XLA compilation cache for the whole run.

All must be set before JAX starts its backends, hence here, at collection time. The cache is a fresh directory per
run, shared by the pytest-xdist workers and the CLI subprocesses (they inherit the environment): a program that two
tests compile alike (the README's API snippet and the training tests' `tiny`, say) is compiled once."""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O1 instead of XLA:CPU's default -O2: the suite's programs are tiny and compiling them is most of its time.
# Measured on `tiny`'s train step: compile 34 -> 24 s, a step 85 -> 116 ms. (-O0 halves the compile but stops
# contracting multiply-adds into FMAs, which the FP8 kernel tests compare bit for bit.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=1").strip()
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsv3c-tests-xla-cache-")
    os.environ["DSV3C_TESTS_OWN_CACHE"] = "1"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config) -> None:
    """The run's cache goes with the run (removed by the process that made it, once every worker is done)."""
    if os.environ.get("DSV3C_TESTS_OWN_CACHE") and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# Files in the order their work starts: the longest first, so that the workers (a whole file each) finish together.
LONGEST_FIRST = ("test_pipeline_lowering.py", "test_train.py", "test_multihost.py", "test_sharding.py",
                 "test_decode.py", "test_fp8.py", "test_ir.py", "test_remat.py", "test_targets.py", "test_readme.py",
                 "test_compile.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(scope="module")
def unoptimized_cpu_code():
    """LLVM at -O0 for the CPU programs built while it is active (through the target's XLA options, which every
    program's jits take). For modules that compile programs of the whole model and run them for a step or two, where
    code generation is a quarter of the time (the DualPipeV test file alone: 104 s against about 130 at -O1).
    Not for tests that check arithmetic bit for bit: -O0 does not contract multiply-adds into FMAs."""
    from dsv3c.targets import CpuTarget

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CpuTarget, "xla_options", {**CpuTarget.xla_options, "xla_backend_optimization_level": 0})
        yield
