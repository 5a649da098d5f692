"""Shared pytest plugins (fixtures that several tiers' modules use)."""

pytest_plugins = ["tests.k8s.syncplane_fixtures", "tests.backends"]
