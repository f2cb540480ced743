# syntax=docker/dockerfile:1
# The base is overridable: any Debian-like image with Python >= 3.11 and the venv module, where `python` is on PATH
# (the official slim image, or the local one .ci/container_check.sh makes with debootstrap).
ARG BASE=python:3.11-slim

# ---- build: a virtualenv with exactly the locked runtime closure (hash-checked), then the project itself
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/aframp
COPY requirements.lock /src/requirements.lock
RUN /opt/aframp/bin/pip install --no-deps --require-hashes -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY actors /src/actors
COPY tiers /src/tiers
# --no-build-isolation: setuptools comes from the lock too, so nothing unlocked is fetched
RUN /opt/aframp/bin/pip install --no-deps --no-build-isolation /src \
 && /opt/aframp/bin/python -m compileall -q /opt/aframp/lib

# ---- runtime: the same base, the virtualenv, a non-root user owning the data dir
FROM ${BASE}
RUN useradd --create-home --uid 10001 --user-group aframp \
 && mkdir -p /data /etc/aframp \
 && chown aframp:aframp /data
COPY --from=build /opt/aframp /opt/aframp
COPY config.toml /etc/aframp/config.toml
# HOST 0.0.0.0: reachable through a published port. With no DATABASE_URL / REDIS_URL the service starts an embedded
# Postgres (with demo data) and an embedded Redis under AFRAMP_DATA_DIR, which is a volume so they outlive the container.
ENV PATH=/opt/aframp/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 PORT=8080 \
    AFRAMP_CONFIG=/etc/aframp/config.toml \
    AFRAMP_DATA_DIR=/data
WORKDIR /home/aframp
VOLUME /data
USER aframp
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('PORT','8080'), timeout=2)"]
ENTRYPOINT ["aframp-cache"]
CMD ["serve"]
