"""``clipcli`` command line. Importing this is cheap: torch loads only inside commands."""

from . import encode_commands, index_commands, scoring_commands, train_commands, weights_commands  # noqa: F401  (register their commands)
from .app import app


def main() -> None:
    app()
