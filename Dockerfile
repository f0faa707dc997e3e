# The fleet's image: every process runs `fleet ...` (worker, scheduler, migrate, the CLI).
# docker-compose.yml builds it; it is not built in CI (Docker does not run there), where a
# test checks that everything it copies exists.
FROM python:3.11.10-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/config-fleet
COPY pyproject.toml README.md ./
COPY workers ./workers
COPY tasks ./tasks
COPY schedules ./schedules
COPY monitoring ./monitoring
# /var/lib/fleet/audit exists (owned by fleet) so that a volume mounted there is writable.
RUN pip install . \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/fleet fleet \
    && install -d -o fleet -g fleet /var/lib/fleet/audit

USER fleet
WORKDIR /var/lib/fleet
ENV FLEET_HOME=/var/lib/fleet \
    FLEET_LOG_FORMAT=json
# Workers serve /metrics on FLEET_METRICS_PORT, schedulers on the port after it.
EXPOSE 9808 9809
ENTRYPOINT ["fleet"]
CMD ["--help"]
