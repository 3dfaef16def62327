"""Modules of ``benchmarks/cross_arch_fashion_mnist.py``: its rows (:mod:`.rows`) and its results document
(:mod:`.results`)."""
