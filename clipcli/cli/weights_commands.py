"""`clipcli models`, `clipcli download`, `clipcli convert` (see issue: weights)."""
from .app import app, command  # noqa: F401
