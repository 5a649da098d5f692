"""syncplane verify: compare a workflow's source and destination (compare.py pure, run.py I/O)."""
