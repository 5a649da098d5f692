"""Egress: Campaign email events to Dynamics 365 activities."""
