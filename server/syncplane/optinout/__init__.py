"""Opt-in/out sync: Campaign ``blackList*``/``ccpaOptOut`` ↔ Dynamics ``donot*`` flags, in one of
four modes (disabled, CRM → marketing, marketing → CRM, bidirectional), with no echo.

``build_optinout(...)`` makes the :class:`OptInOutSync` a worker runs; :mod:`.rules` holds the
pure decisions (conflicts, echoes); :mod:`.memory` the durable echo memory."""

from syncplane.optinout.rules import Direction, FieldPair
from syncplane.optinout.sync import OptInOutSync, PassStats, build_optinout

__all__ = ["Direction", "FieldPair", "OptInOutSync", "PassStats", "build_optinout"]
