"""Versioned benchmark definitions (installed as the package ``stbench_benchmarks``).

Each folder holds ``benchmark.yaml`` and the data files it names (gene panels). Performance
benchmark scripts live beside them and are not part of the installed package.
"""
