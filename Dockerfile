# mjgate: gunicorn with uvicorn workers, configured by a mounted file and the environment.
#
#   docker build -t mjgate .
#   docker run -p 8080:8080 -v "$PWD/config.yaml:/etc/mjgate/config.yaml:ro" \
#     -e MAIN_MJ_KEY=... -e REDIS_URL=redis://redis:6379/0 mjgate
#
# The config file holds ${VAR} references; the secrets themselves come from the environment.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: the package and its dependencies, installed into a virtual environment ----------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/mjgate \
    PATH=/opt/mjgate/bin:$PATH

RUN python -m venv /opt/mjgate
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# tests/test_deploy.py runs this very command in a fresh virtual environment.
RUN pip install --no-cache-dir .

# -- runtime: the virtual environment and the gunicorn settings, nothing else ---------------
FROM ${PYTHON_IMAGE}

ENV PATH=/opt/mjgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MJGATE_CONFIG=/etc/mjgate/config.yaml \
    MJGATE_BIND=0.0.0.0:8080 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/mjgate-metrics

RUN groupadd --system --gid 10001 mjgate \
    && useradd --system --uid 10001 --gid mjgate --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin mjgate

COPY --from=builder /opt/mjgate /opt/mjgate
WORKDIR /app
COPY deploy/gunicorn.conf.py deploy/gunicorn.conf.py

USER 10001:10001
EXPOSE 8080

# /healthz answers while the process serves; python is already here, curl is not.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('MJGATE_BIND', ':8080').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

# SIGTERM (docker stop, Kubernetes) is gunicorn's graceful shutdown: stop accepting, finish
# in-flight requests within graceful_timeout, close clients and pools.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
