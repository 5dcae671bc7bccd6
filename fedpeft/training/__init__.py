"""Local training and evaluation of a model on one site's data, and its batching (used by DP-SGD and by sites)."""
