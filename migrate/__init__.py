"""livemig's engine: QMP sessions, strategies, policy, preflight, reports and CLI."""

from migrate.errors import (
    ConfigError,
    LivemigError,
    MigrationAborted,
    MigrationError,
    PreflightError,
    QemuError,
)

__all__ = [
    "ConfigError",
    "LivemigError",
    "MigrationAborted",
    "MigrationError",
    "PreflightError",
    "QemuError",
]
