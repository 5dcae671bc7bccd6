"""Named keys of everything that travels between the ServerApp and the ClientApps (the wire protocol)."""

ADAPTER = "adapter"  # ArrayRecord: global adapter (server -> site) or the site's update delta (site -> server)
CONFIG = "config"  # ConfigRecord: per-round instructions
METRICS = "metrics"  # MetricRecord: the site's reply metrics

# ConfigRecord keys (server -> site)
SERVER_ROUND = "server-round"
RANK_KEEP = "rank-keep"  # AdaLoRA: bits, one per singular value (sorted tensor names), 1 = trains this round
# Distributed DP (privacy.dp_mode = "distributed"): the round's public parameters, which each site re-derives and
# checks before it releases anything
DDP_SCALE = "ddp-scale"  # integer units per unit of gradient
DDP_BITS = "ddp-bits"  # the ring Z_2^bits of the secure sum
DDP_COHORT = "ddp-cohort"  # m: the fewest sites whose noise shares are in the sum
DDP_MU = "ddp-mu"  # the Skellam variance of the whole sum the round is planned for

# MetricRecord keys (site -> server)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
PARTITION_ID = "partition-id"
REFUSED = "refused"  # 1 when the site refused the round (policy or budget) and trained nothing
EPSILON = "epsilon"  # the site's cumulative example-level epsilon after the round
SAMPLE_RATE = "sample-rate"  # DP-SGD's Poisson sampling rate at the site this round (1: every row, every step)

# ConfigRecord keys (site -> server): a refusal (fedpeft.messaging.Refusal)
REFUSAL_RULE = "refusal-rule"  # the rule that forbids the round (a policy key, "privacy_budget", ...)
REFUSAL_REASON = "refusal-reason"  # the reason in values; never a site's file path

# Flower node_config keys set by the simulation engine for each virtual SuperNode
NODE_PARTITION_ID = "partition-id"  # in a deployment: the site's index (seeds, metrics), set by `fedpeft client`
NODE_NUM_PARTITIONS = "num-partitions"
NODE_POLICY_FILE = "policy-file"  # a site's own privacy policy (node-local path), wins over privacy.policy_file
NODE_LEDGER_PATH = "ledger-path"  # where the site keeps its privacy ledger
NODE_DATA_PATH = "data-path"  # deployment: the site's own data file, read whole (no partitioning)
NODE_AUDIT_LOG = "audit-log"  # deployment: the site's signed audit log
NODE_AUDIT_KEY = "audit-key"  # deployment: the site's Ed25519 audit key (PEM)
NODE_BASE_MODEL = "base-model"  # deployment: the site's local copy of the base model (name or directory)
NODE_WORKER_SOCKET = "worker-socket"  # deployment: the site's warm worker (Unix socket); the ClientApp forwards to it

# Secure aggregation (SecAgg+): message types and keys (ConfigRecord unless noted). Key set-up (two exchanges) runs
# once per key epoch; a steady-state round is two exchanges: masked input (the TRAIN message), then unmasking.
SECAGG_KEYS = "query.secagg_keys"  # set-up 1: advertise public keys
SECAGG_SHARES = "query.secagg_shares"  # set-up 2: encrypted Shamir shares of each epoch round's secrets
SECAGG_UNMASK = "query.secagg_unmask"  # round: reveal shares for survivors' self masks / dropped sites' keys
# the masked input rides the ordinary TRAIN message
SA_EPOCH = "secagg-epoch"  # the key epoch's id (16 random bytes), in every secure message
SA_FIRST_ROUND = "secagg-first-round"  # the first round the epoch's keys serve
SA_LAST_ROUND = "secagg-last-round"  # the last round the epoch's keys serve
SA_INDEX = "secagg-index"  # the site's index in this epoch (1..n; Shamir share ids)
SA_NUM = "secagg-n"
SA_THRESHOLD = "secagg-threshold"
SA_CHANNEL_PK = "secagg-channel-pk"
SA_MASK_PK = "secagg-mask-pk"  # the public masking keys of each of the epoch's rounds, concatenated
SA_NEIGHBOURS = "secagg-neighbours"  # indices
SA_NEIGHBOUR_CHANNEL_PKS = "secagg-neighbour-channel-pks"
SA_NEIGHBOUR_MASK_PKS = "secagg-neighbour-mask-pks"
SA_TO = "secagg-to"  # recipients of the ciphertexts, parallel to SA_CIPHERTEXTS
SA_FROM = "secagg-from"  # senders of the ciphertexts, parallel to SA_CIPHERTEXTS
SA_CIPHERTEXTS = "secagg-ciphertexts"
SA_SURVIVORS = "secagg-survivors"  # indices that delivered what the previous stage asked
SA_DROPPED = "secagg-dropped"
SA_SELF_MASK_FROM = "secagg-self-mask-from"
SA_SELF_MASK_SHARES = "secagg-self-mask-shares"
SA_KEY_FROM = "secagg-key-from"
SA_KEY_SHARES = "secagg-key-shares"
SA_MASKED = "secagg-masked"  # ArrayRecord key of the masked, fixed-point upload (uint ring vector)
SA_STATE = "secagg"  # the site's key-epoch secrets in its node state (never sent)
