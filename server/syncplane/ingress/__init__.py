"""Ingress (Dynamics 365 -> Campaign): the pure record transform of one entity mapping."""

from syncplane.ingress.transform import Action, EntityTransform, Transformed

__all__ = ["Action", "EntityTransform", "Transformed"]
