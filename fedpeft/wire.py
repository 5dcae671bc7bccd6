"""Named keys of everything that travels between the ServerApp and the ClientApps (the wire protocol)."""

ADAPTER = "adapter"  # ArrayRecord: global adapter (server -> site) or the site's update delta (site -> server)
CONFIG = "config"  # ConfigRecord: per-round instructions
METRICS = "metrics"  # MetricRecord: the site's reply metrics

# ConfigRecord keys (server -> site)
SERVER_ROUND = "server-round"

# MetricRecord keys (site -> server)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
PARTITION_ID = "partition-id"

# Flower node_config keys set by the simulation engine for each virtual SuperNode
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
