"""Only the C extension lives here; everything else is in pyproject.toml (setuptools merges them).

edgekit.runtime._fastpath (edgekit/runtime/_fastpath.c) uses the CPython C API only (no NumPy).
-ffp-contract=off keeps aarch64 (Jetson) from fusing a*b+c into FMAs, which would round
differently from the NumPy reference and break seed-for-seed parity; never add -ffast-math or
-march=native (the build must run on other CPUs; x86-64 picks an AVX2 kernel at import time).
optional=True: without a C compiler the install still succeeds and edgekit.runtime.fastpath
falls back to the NumPy reference with a warning (CI sets EDGEKIT_REQUIRE_FASTPATH=1 so a
missing build fails the tests instead).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edgekit.runtime._fastpath",
            sources=["edgekit/runtime/_fastpath.c"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-trapping-math"],
            optional=True,
        )
    ]
)
