"""``clipcli`` command line. Importing this is cheap: torch loads only inside commands."""

from . import (  # noqa: F401  (register their commands)
    duplicates_commands,
    encode_commands,
    index_commands,
    scoring_commands,
    serve_commands,
    train_commands,
    weights_commands,
)
from .app import app, flush_at_exit, mend_streams


def main() -> None:
    mend_streams()
    with flush_at_exit():
        app()
