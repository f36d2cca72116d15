"""Shared pytest configuration.

Hypothesis profiles: ``ci`` (loaded when the environment has ``CI=true``) is derandomized, so a
CI failure reproduces from the same examples, and has no deadline, because building a teacher
takes a variable 0.1-1 s on a shared 2-core runner. ``dev`` (the default) draws fresh random
examples each run. ``HYPOTHESIS_PROFILE=<name>`` picks one explicitly. Tests that pass their own
``@settings(...)`` override these values field by field.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=10)
# a long hunt for new counter-examples (HYPOTHESIS_PROFILE=thorough), not run in CI
settings.register_profile("thorough", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow])

_default = "ci" if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread, restoring the setting afterwards.

    Tiny convs gain nothing from threads, and on a shared 2-core runner spinning OpenMP threads
    slow them ~5x. Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
