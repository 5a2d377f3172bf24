"""Dispatch policies: how the broker chooses a worker for a request.

Importing this package registers every policy (each module's ``Policy`` subclass registers
itself by ``name`` in ``POLICIES``); ``make_policy(name, rng)`` builds one.
"""

# Imported for their side effect: each registers its policy in POLICIES.
from zrouter.broker.policies import (  # noqa: F401
    consistent_hash,
    least_outstanding,
    p2c_ewma,
    random_pick,
    round_robin,
    weighted,
    weighted_least_outstanding,
)
from zrouter.broker.policies.base import POLICIES, Endpoint, Policy, make_policy

__all__ = ["POLICIES", "Endpoint", "Policy", "make_policy"]
