from __future__ import annotations

import pytest

from fedpeft.errors import PrivacyError
from fedpeft.privacy.accounting import (
    Accountant,
    build_accountant,
    check_accountant,
    epsilon,
    register_accountant,
    registered_accountants,
)


def test_the_registry_lists_prv_then_rdp():
    registry = registered_accountants()
    assert list(registry) == ["prv", "rdp"]
    assert all(issubclass(cls, Accountant) and cls.name == name for name, cls in registry.items())


def test_registered_accountants_is_a_copy():
    registered_accountants().pop("prv")
    assert "prv" in registered_accountants()


@pytest.mark.parametrize("call", [lambda: check_accountant("gdp"), lambda: build_accountant("gdp"),
                                  lambda: epsilon([(1.0, 0.01, 10)], 1e-5, "gdp")])
def test_an_unknown_accountant_is_named_with_the_registered_ones(call):
    with pytest.raises(PrivacyError, match=r"accountant 'gdp' is unknown; use one of prv, rdp \('prv' is tighter"):
        call()


def test_an_unhashable_accountant_name_is_refused_clearly():
    with pytest.raises(PrivacyError, match=r"accountant \['prv'\] is unknown"):
        check_accountant(["prv"])


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_each_accountant_builds_its_opacus_accountant(name):
    from opacus.accountants import PRVAccountant, RDPAccountant

    expected = PRVAccountant if name == "prv" else RDPAccountant
    accountant = build_accountant(name)
    assert accountant.name == name
    assert isinstance(accountant.opacus_accountant(), expected)


def test_a_name_cannot_be_registered_twice():
    class Duplicate(Accountant):
        name = "prv"
        trade_off = "a duplicate"

        def opacus_accountant(self):
            raise AssertionError("never built")

    with pytest.raises(ValueError, match="'prv' is registered twice"):
        register_accountant(Duplicate)
    assert registered_accountants()["prv"] is not Duplicate
