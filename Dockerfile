# ModelGate container image.
#
#   docker build -t modelgate .
#   docker run --read-only -p 8010:8010 -v modelgate-usage:/data --env-file .env modelgate
#
# The base image is named in one place; any Debian-based official Python image works:
#   docker build --build-arg PYTHON_IMAGE=python:3.13-slim -t modelgate .
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

# No .pyc files written at run time (the root file system is read-only anyway); logs unbuffered.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app

# Dependencies are pure-Python wheels: no compiler is needed, so one stage is as small as two. pip keeps no
# cache; it does compile the dependencies' .pyc files now, so start-up never compiles them (it could not
# cache them on a read-only file system).
COPY requirements.txt ./
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore --requirement requirements.txt

# A dedicated unprivileged user, numeric so that orchestrators can check it is not root
# (Kubernetes runAsNonRoot). The code stays owned by root: the process can read it, not change it.
# /data, owned by that user, is where the usage counts are kept (USAGE_DB): a volume, so that it is writable
# under `docker run --read-only` and the counts outlive the container (compose names the volume).
RUN groupadd --system --gid 10001 modelgate \
 && useradd --system --uid 10001 --gid modelgate --no-log-init --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin modelgate \
 && mkdir /data && chown 10001:10001 /data
ENV USAGE_DB=/data/modelgate-usage.sqlite3
VOLUME ["/data"]
USER 10001:10001

COPY modelgate.py ./

EXPOSE 8010

# The slim image has no curl: ask /health with the standard library, on the port the gateway was given,
# bypassing any HTTP_PROXY in the environment. An exception (refused, timeout, non-2xx) exits 1: unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8010'), timeout=4)"]

# Exec form: python is PID 1 and receives SIGTERM itself (docker stop), so uvicorn stops accepting,
# lets in-flight requests and streams finish, and the process exits 0. `python modelgate.py` also keeps
# idle client connections open 75 s (not uvicorn's 5 s), like every other way of running it.
CMD ["python", "modelgate.py"]
