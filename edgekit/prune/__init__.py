"""Structured pruning (heads, MLP channels, hidden channels, layers) by activation importance."""
