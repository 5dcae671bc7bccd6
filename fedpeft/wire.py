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
REFUSED = "refused"  # 1 when the site refused the round (policy or budget) and trained nothing
EPSILON = "epsilon"  # the site's cumulative example-level epsilon after the round

# ConfigRecord keys (site -> server)
REFUSAL_REASON = "refusal-reason"

# Flower node_config keys set by the simulation engine for each virtual SuperNode
NODE_PARTITION_ID = "partition-id"
REFUSED = "refused"  # 1 when the site refused the round (policy or budget) and trained nothing
EPSILON = "epsilon"  # the site's cumulative example-level epsilon after the round

# ConfigRecord keys (site -> server)
REFUSAL_REASON = "refusal-reason"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_POLICY_FILE = "policy-file"  # a site's own privacy policy (node-local path), wins over privacy.policy_file
NODE_LEDGER_PATH = "ledger-path"  # where the site keeps its privacy ledger
