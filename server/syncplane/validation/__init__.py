"""Field-by-field validation of Workflow specs (pure; no I/O)."""

from syncplane.validation.spec import apply_defaults, validate_labels, validate_spec

__all__ = ["apply_defaults", "validate_labels", "validate_spec"]
