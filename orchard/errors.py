"""The errors a user can act on: the CLI prints them as one line instead of a traceback."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types whose message alone tells the user what to fix."""
    from orchard.cluster import ClusterError
    from orchard.config import ConfigError
    from orchard.engine import EngineError
    from orchard.lake import LakeError
    from orchard.sandbox import SandboxUnavailable
    from orchard.services import ServiceError
    from orchard.store import StoreError
    from tasks.export import ExportError
    from tasks.grow import GrowError
    from tasks.seeds import SeedError
    from tasks.verify import VerificationError

    return (ClusterError, ConfigError, EngineError, LakeError, ServiceError, StoreError, ExportError, GrowError, SeedError,
            SandboxUnavailable, VerificationError)
