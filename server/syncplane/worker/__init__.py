"""The worker process (`syncplane worker`): runs one workflow replica and
reports a heartbeat over loopback HTTP (/status, /healthz, /metrics)."""
