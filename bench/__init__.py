"""Benchmarks of the dispatcher on the real local stack (``python -m bench``).

Every scenario is measured beside "the limit": the same Python client creating the
same objects on the same apiserver in the same run. See bench/README.md.
"""
