"""Database access: engines, sessions and migrations for PostgreSQL and SQLite."""

from workers.db.engine import make_engine, make_session_factory
from workers.db.migrate import current_revision, head_revision, migrate

__all__ = [
    "current_revision",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "migrate",
]
