"""The runtime every fleet process shares: settings, Celery app, database, CLI."""

__version__ = "0.1.0"
