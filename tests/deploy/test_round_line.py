"""The coordinator's console names the sites that failed or refused a round, never their node ids or indices."""

from __future__ import annotations

from fedpeft.deploy.coordinator import round_line


def test_failed_and_refusing_sites_are_shown_by_their_pki_names_with_the_reason():
    record = {"round": 3, "global_accuracy": 0.5, "sites_returned": 1,
              "failures": {"1607021074853207268": "masked input: Error: Node Unavailable"},
              "refusals": {"0": "site 0: round 3 is already in the privacy ledger"}}
    names = {"0": "hospital-a", "1": "hospital-b", "1607021074853207268": "hospital-c"}
    line = round_line(record, names)
    assert line.startswith("round 3: accuracy 0.500, sites returned 1")
    assert "failed: hospital-c (masked input: Error: Node Unavailable)" in line
    assert "refused: hospital-a (site 0: round 3 is already in the privacy ledger)" in line
    assert "1607021074853207268" not in line


def test_a_clean_round_and_an_unknown_key_read_plainly():
    assert round_line({"round": 0, "global_accuracy": 0.25}, {}) == "round 0: accuracy 0.250, sites returned -"
    line = round_line({"round": 1, "sites_returned": 0, "failures": {"secagg": "below the threshold"}}, {})
    assert line.endswith("sites returned 0; failed: secagg (below the threshold)")
