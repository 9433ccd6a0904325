"""``clipcli`` command line. Importing this is cheap: torch loads only inside commands."""

import sys

from . import (  # noqa: F401  (register their commands)
    duplicates_commands,
    encode_commands,
    index_commands,
    scoring_commands,
    serve_commands,
    train_commands,
    weights_commands,
)
from .app import app, exit_now, flush_at_exit, mend_streams, only_command


def main() -> None:
    mend_streams()
    try:
        with flush_at_exit(), only_command(sys.argv):
            app()
    except SystemExit as done:  # every run ends here (Typer exits even on success)
        exit_now(done)
