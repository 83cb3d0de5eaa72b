"""Benchmarks of archserve: load generator, engine-only runs, a naive baseline server, the `make bench` driver.

Run each as ``python -m bench.<name>`` from the repository root; see bench/README.md.
"""
