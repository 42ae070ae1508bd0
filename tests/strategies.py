"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

seeds = st.integers(min_value=0, max_value=2**16)
batch_sizes = st.integers(min_value=1, max_value=24)
sample_counts = st.integers(min_value=2, max_value=60)
class_counts = st.integers(min_value=2, max_value=6)
