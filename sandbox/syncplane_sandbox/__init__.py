"""``syncplane_sandbox``: local, protocol-faithful emulators of the documented subsets of
the Dynamics 365 (Dataverse) Web API and the Adobe Campaign Standard REST API.

They are emulators, and say so: every response carries ``X-Syncplane-Sandbox: emulator``
and startup logs a banner. State is in memory; both servers listen on loopback.

A package of its own (``sandbox/pyproject.toml``), installed by ``make setup`` for the tests and
``make run`` and never into the runtime image; the product (``syncplane``) never imports it.

    sandbox = await start_sandbox(seed=SeedSpec(contacts=1000))
    ...  # sandbox.d365_url, sandbox.d365_token_url, sandbox.acs_url, sandbox.acs_token_url
    sandbox.faults.d365.set(rate_429=0.1)      # or PUT /_sandbox/faults on either port
    sandbox.faults.acs.hold()                  # writes wait unanswered (PUT /_sandbox/faults/hold) ...
    sandbox.faults.acs.release_held()          # ... until released (DELETE /_sandbox/faults/hold)
    with sandbox.faults.acs.holding():         # or both around a block, released however it ends
        ...
    sandbox.d365.table("contacts").upsert(firstname="Ada")
    await sandbox.stop()

Command line: ``syncplane-sandbox --d365-port 7480 --acs-port 7481 --seed-contacts 1000`` (or
``python -m syncplane_sandbox``); ``syncplane-sandbox-up`` is ``syncplane up`` with the emulators
beside it (``quickstart.py``).
See ``d365.py`` and ``acs.py`` for the endpoints and the documented choices.
"""

from syncplane_sandbox.acs_state import (
    FORCE_PAGINATION_THRESHOLD,
    MARKETING_USER,
    AcsError,
    AcsField,
    AcsResource,
    AcsState,
)
from syncplane_sandbox.common import (
    SANDBOX_ACS_ORG,
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
    SANDBOX_HEADER,
    SANDBOX_HEADER_VALUE,
    SANDBOX_TENANT_ID,
    FaultConfig,
    Faults,
    RequestLog,
    RequestRecord,
    SandboxClock,
    ServiceProtectionLimits,
)
from syncplane_sandbox.d365_state import (
    DELTA_TOKEN_EXPIRED_CODE,
    DELTA_TOKEN_EXPIRED_STATUS,
    POISON_CODE,
    QUERY_NOT_SUPPORTED_CODE,
    Column,
    D365State,
    ODataError,
    Table,
)
from syncplane_sandbox.seed import SeedSpec
from syncplane_sandbox.server import Sandbox, SandboxFaults, SandboxOptions, main, run_forever, start_sandbox

__all__ = [
    "DELTA_TOKEN_EXPIRED_CODE",
    "DELTA_TOKEN_EXPIRED_STATUS",
    "FORCE_PAGINATION_THRESHOLD",
    "MARKETING_USER",
    "POISON_CODE",
    "QUERY_NOT_SUPPORTED_CODE",
    "SANDBOX_ACS_ORG",
    "SANDBOX_CLIENT_ID",
    "SANDBOX_CLIENT_SECRET",
    "SANDBOX_HEADER",
    "SANDBOX_HEADER_VALUE",
    "SANDBOX_TENANT_ID",
    "AcsError",
    "AcsField",
    "AcsResource",
    "AcsState",
    "Column",
    "D365State",
    "FaultConfig",
    "Faults",
    "ODataError",
    "RequestLog",
    "RequestRecord",
    "Sandbox",
    "SandboxClock",
    "SandboxFaults",
    "SandboxOptions",
    "SeedSpec",
    "ServiceProtectionLimits",
    "Table",
    "main",
    "run_forever",
    "start_sandbox",
]
