"""`clipcli encode`, `clipcli classify`, `clipcli similarity`."""
from .app import app, command  # noqa: F401
