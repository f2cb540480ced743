# syntax=docker/dockerfile:1
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md config.toml ./
COPY service ./service
COPY actors ./actors
COPY tiers ./tiers
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[fast]'

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 aframp
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY --chown=aframp:aframp config.toml ./
USER aframp
ENV HOST=0.0.0.0 PORT=8080 AFRAMP_DATA_DIR=/app/data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=20s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('PORT','8080'), timeout=2)"
ENTRYPOINT ["aframp-cache"]
CMD ["serve"]
