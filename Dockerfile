# syncplane: one image for the API server, the operator and the workers
# (`syncplane server|operator|worker ...`; the operator gives this image to the worker Deployments it builds).
#
#   docker build -t ghcr.io/syncplane/syncplane:0.1.0 .
#   buildah bud --isolation chroot -t ghcr.io/syncplane/syncplane:0.1.0 .
#
# BASE is any Debian image whose `python3` is CPython 3.11 with the venv module. The default is the official
# slim image pinned by digest; `make image` (scripts/build-image.sh) builds a Debian bookworm base with
# debootstrap (python3 + python3-venv) and passes it with --build-arg BASE=... .
ARG BASE=docker.io/library/python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# ---- build: a wheel of every locked dependency (each file checked against the lock's hashes) and of the project
FROM ${BASE} AS build
# A package index or a CA bundle of the builder's network (empty: PyPI with the base's own CAs).
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python3 -m venv /opt/build
COPY requirements.lock ./
RUN /opt/build/bin/pip wheel --require-hashes --only-binary=:all: --wheel-dir /wheels -r requirements.lock
COPY pyproject.toml ./
COPY server/ server/
COPY operator/ operator/
# (not sandbox/: the emulators are a package of their own, for the tests and `make run`, never in the image)
RUN /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: the wheels installed into a virtualenv (no pip left in it), run as a non-root user
FROM ${BASE} AS runtime
LABEL org.opencontainers.image.title="syncplane" \
      org.opencontainers.image.description="syncplane: the API server, the operator and the workers (syncplane server|operator|worker)"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/syncplane/bin:$PATH
RUN --mount=type=bind,from=build,source=/,target=/build \
    python3 -m venv /opt/syncplane \
 && /opt/syncplane/bin/pip install --quiet --disable-pip-version-check --no-cache-dir --no-index \
      --require-hashes --find-links=/build/wheels -r /build/src/requirements.lock \
 && /opt/syncplane/bin/pip install --quiet --disable-pip-version-check --no-cache-dir --no-index --no-deps \
      /build/wheels/syncplane-*.whl \
 && /opt/syncplane/bin/pip uninstall --quiet --yes pip setuptools \
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
