"""Files that hold secrets or customer data: created private, refused when exposed.

Embedded, everything under the data directory is created 0700/0600 (:data:`PRIVATE_UMASK`):
its databases hold dead letters with names and e-mail addresses. A secret file, token file or
TLS key that other users can read or anyone but its owner can write is refused, as ssh refuses
a private key: the message names the file and the fix. Group read is allowed because
Kubernetes projects Secret volumes as ``0440`` owned by the pod's ``fsGroup``; our own files
are never group-readable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: The umask of an embedded control plane and its workers: files 0600, directories 0700.
PRIVATE_UMASK = 0o077
#: Permission bits a secret file must not have: anything for others, group write or execute.
EXPOSED_BITS = stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP


class ExposedFileError(Exception):
    """A secret file other users can read or write. ``str()`` says which file and how to fix it."""


def check_private(path: Path, what: str) -> None:
    """Refuse ``path`` (``what`` names it, e.g. ``TLS key``) when :data:`EXPOSED_BITS` are set.

    Raises:
        ExposedFileError: with the file, its mode and the ``chmod`` that fixes it.
        OSError: when the file cannot be read at all.
    """
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & EXPOSED_BITS:
        raise ExposedFileError(f"{what} {path} is accessible by other users (mode {mode:04o}); "
                               f"restrict it with: chmod 600 {path}")


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) as 0700, and take group/other access away from it if it exists."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(mode & 0o700)
