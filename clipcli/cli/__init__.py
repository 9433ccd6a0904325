"""``clipcli`` command line. Importing this is cheap: torch loads only inside commands."""

from .app import app
from . import weights_commands, scoring_commands, train_commands  # noqa: F401  (register their commands)


def main() -> None:
    app()
