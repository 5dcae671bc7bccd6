"""Simulated federations on Flower's simulation engine (Ray backend)."""
