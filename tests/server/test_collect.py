"""What the server reads from a site's reply metrics besides the update."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fedpeft import wire
from fedpeft.server.collect import RoundCollection, _note_payload


def test_epsilon_and_whole_batch_dp_sites_are_noted_per_site():
    out = RoundCollection()
    record = ArrayRecord([np.zeros(3, dtype=np.float32)])
    _note_payload(out, MetricRecord({wire.PARTITION_ID: 0, wire.EPSILON: 1.5, wire.SAMPLE_RATE: 1.0}), record, "0")
    _note_payload(out, MetricRecord({wire.PARTITION_ID: 1, wire.EPSILON: 0.5, wire.SAMPLE_RATE: 0.1}), record, "1")
    _note_payload(out, MetricRecord({wire.PARTITION_ID: 2}), record, "2")  # no DP
    assert out.site_epsilon == {"0": 1.5, "1": 0.5}
    assert out.whole_batch_sites == ["0"]
    assert set(out.payload_bytes) == {"0", "1", "2"}
