"""Reusable test kits for ojs-trio adapters: the storage contract suite."""

from ojs_trio.testing.storage_contract import (
    CONTRACT_CHECKS,
    T0,
    ContractCheck,
    StorageFactory,
    check_storage,
    make_job,
    storage_factory,
)

__all__ = [
    "CONTRACT_CHECKS",
    "T0",
    "ContractCheck",
    "StorageFactory",
    "check_storage",
    "make_job",
    "storage_factory",
]
