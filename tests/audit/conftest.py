"""One real simulated run with DP whose audit logs the audit tests tamper with (copies, never the original)."""

from __future__ import annotations

import pytest

from fedpeft.composition import from_mapping


@pytest.fixture(scope="session")
def audited_run(tmp_path_factory):
    from fedpeft.simulations.engine import simulate

    out = tmp_path_factory.mktemp("audited")
    cfg = from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "federation": {"rounds": 2, "num_sites": 3, "fraction_train": 0.67},
        # A ledger per run, on purpose (privacy.ledger_dir with {run}): each site's files are in <run dir>/sites.
        "privacy": {"dp": True, "target_epsilon": 8.0, "ledger_dir": str(out / "{run}" / "sites")},
        "data": {"synthetic_examples": 90},
        "run": {"name": "audited", "out_dir": str(out)},
    })
    return simulate(cfg).run_dir
