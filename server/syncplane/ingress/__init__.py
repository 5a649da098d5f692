"""Ingress (Dynamics 365 -> Campaign): the pure record transform of one entity mapping."""

from syncplane.ingress.transform import EntityTransform

__all__ = ["EntityTransform"]
