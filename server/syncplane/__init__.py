"""syncplane: a control plane for CRM <-> marketing-platform integration workflows."""

__version__ = "0.1.0"
