# syntax=docker/dockerfile:1
# syncplane: one image for the API server, the operator and the workers
# (`syncplane server|operator|worker ...`; the operator gives this image to the worker Deployments it builds).
#
#   docker build -t ghcr.io/syncplane/syncplane:0.1.0 .

ARG PYTHON_VERSION=3.12

# ---- build: a wheel of the project and of every dependency (compilers stay in this stage)
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY operator/ operator/
RUN pip wheel --wheel-dir /wheels .

# ---- runtime: the wheels installed into a virtualenv, run as a non-root user
FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/syncplane/bin:$PATH
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/syncplane \
 && /opt/syncplane/bin/pip install --no-index --find-links=/wheels syncplane \
 && groupadd --system --gid 10001 syncplane \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin syncplane
# The chart and the worker Deployments run with a read-only root filesystem and an emptyDir on /tmp.
WORKDIR /tmp
USER 10001:10001
# gRPC API (server), operator liveness, worker /status /healthz /metrics
EXPOSE 7443 8081 8080
ENTRYPOINT ["syncplane"]
CMD ["--help"]
