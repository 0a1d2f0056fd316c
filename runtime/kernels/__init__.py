"""Kernels: alternative implementations of the compute-heavy dsv3 ops (attention cores, grouped expert GEMMs),
one module each. A target's lowering table picks one per op, as the op's `impl` attribute in the IR says."""
