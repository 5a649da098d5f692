"""The one line each long-running command logs at start-up: what it is, its version, where it listens,
its backend and the namespaces it covers (what an operator of the service checks first)."""

from __future__ import annotations

from collections.abc import Sequence

from syncplane import __version__


def startup_line(component: str, *, listen: str | None = None, tls: bool | None = None, backend: str | None = None,
                 namespaces: Sequence[str] | None = None, **extra: object) -> str:
    """``syncplane <component> <version>: listen=... tls=on backend=... namespaces=a,b [k=v ...]``;
    ``namespaces`` empty means every namespace (``all``). No secret belongs in ``extra``."""
    parts = [f"syncplane {component} {__version__}:"]
    if listen is not None:
        parts.append(f"listen={listen}")
    if tls is not None:
        parts.append(f"tls={'on' if tls else 'off'}")
    if backend is not None:
        parts.append(f"backend={backend}")
    if namespaces is not None:
        parts.append(f"namespaces={','.join(namespaces) if namespaces else 'all'}")
    parts.extend(f"{key}={value}" for key, value in extra.items())
    return " ".join(parts)
