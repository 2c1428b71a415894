"""Decode-time runtime helpers for the deployed model (issue #6).

``edgekit.runtime.fastpath`` is the public API: per-step token sampling (temperature,
top-k, top-p, min-p, repetition / frequency / presence penalties, seedable RNG),
confidence statistics, the speculative-decoding acceptance rule and streaming latency
statistics. It runs on the C extension ``edgekit.runtime._fastpath`` when that is built
and falls back to the NumPy reference ``edgekit.runtime.sampling_ref`` otherwise; both
follow the same documented algorithm, so a seed gives the same tokens on either.

Importing this package imports nothing heavy (no numpy, no torch); import the submodules
you need.
"""
