"""``python -m chaos``: the whole fleet under load while its processes, Redis and
PostgreSQL fail, then every invariant checked (see README, "Reliability").

Two schedulers, two workers (``-c 2``) and an exporter run on a schedule table with short
intervals, against a database of the run's own on the PostgreSQL ``make test`` uses and a
Redis server of the run's own (so that it can be restarted). Producers push impressions
and write audit rows; a plan of faults drawn from ``CHAOS_SEED`` is injected meanwhile
(:mod:`chaos.faults`), dead processes restarted as a supervisor would. Then the producers
stop, the fleet drains, and :mod:`chaos.checks` compares what the producers did with what
the fleet did. Exit 0 only when every invariant holds.

Settings: ``CHAOS_SECONDS`` (120), ``CHAOS_SEED`` (random, printed), ``CHAOS_RATE``
(impressions a second, 2000), ``CHAOS_DRAIN_SECONDS`` (150), ``CHAOS_PG_ADMIN_URL``,
``CHAOS_DATABASE`` (fleet_chaos), ``CHAOS_HOME`` (.fleet/chaos), ``CHAOS_BREAK`` (a
deliberately broken build for the run's fleet, to prove the checks fail: ``dead_letters``
or ``ledger``).
"""
