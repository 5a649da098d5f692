"""The worker process (`syncplane worker`): runs one workflow replica, serves its report on
loopback HTTP (/status, /healthz, /metrics) and takes its secrets, stores and heartbeat from
its platform (:mod:`.platform`: ``embedded`` or ``kubernetes``). What it keeps between passes
is in :mod:`syncplane.state`."""
