"""The `syncplane` entry point (``python -m syncplane`` too).

``syncplane worker …`` goes straight to :mod:`syncplane.worker.command`; everything else to the full
command line, :mod:`syncplane.cli`. A worker's start-up is CPU-bound imports: the command line's gRPC
client, service stubs and YAML cost each worker start more CPU than its own command needs, and with
many workers starting at once on a small node every one of them waits for that CPU. One error
boundary for both (:func:`run`)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import click

#: The subcommand that :func:`main` runs without :mod:`syncplane.cli`.
WORKER = "worker"


def main(args: list[str] | None = None) -> None:
    """Run the command ``args`` (default: ``sys.argv[1:]``) names, as :func:`run` says."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == [WORKER]:
        from syncplane.worker.command import worker

        run(worker, argv[1:], prog_name=f"syncplane {WORKER}")
    else:
        from syncplane.cli import cli

        run(cli, argv, prog_name="syncplane")


def run(command: click.Command, args: list[str], prog_name: str) -> None:
    """Run ``command`` with ``args``: every failure is `error: …` on stderr and a non-zero exit
    (2 for a usage error, 130 for Ctrl-C, 1 otherwise); never a traceback."""
    import click

    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False, obj=None)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:   # the one boundary: a user sees a line, never a traceback
        from syncplane.cli import error_text  # (the failure path may import the whole command line)

        click.echo(f"error: {error_text(exc)}", err=True)
        sys.exit(1)
