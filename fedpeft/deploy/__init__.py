"""On-premise deployment: the federation's PKI (and, later, launching Flower's SuperLink/SuperNode processes)."""
