# The pgrecovery operator image: `kopf run -m pgrecovery.main`.
# Two stages: wheels are built with the full toolchain, the runtime stage gets only the package
# and its runtime dependencies (no test or dev extras, no compiler, no pip cache). Runs as an
# unprivileged user with a read-only root filesystem (the chart mounts /tmp and the work dir).
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md .ci/constraints.txt ./
COPY operator ./operator
# Runtime dependencies only, at the versions the test suite was run with.
RUN pip wheel --wheel-dir /wheels --constraint constraints.txt .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp \
    PGRECOVERY_WORK_DIR=/var/lib/pgrecovery
# One apt package: liblzo2 for WAL-E's lzop blocks (loaded through ctypes, see
# backups/wale/lzop.py). SSH is asyncssh, decryption is `cryptography`, gzip is isal (wheels).
COPY --from=build /wheels /wheels
RUN apt-get update \
    && apt-get install -y --no-install-recommends liblzo2-2 \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-index --find-links /wheels pgrecovery \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 pgrecovery \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin pgrecovery \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/pgrecovery
USER 10001:10001
EXPOSE 8080
# The chart and manifests set command and args (namespace, --standalone or --peering).
ENTRYPOINT ["kopf", "run", "-m", "pgrecovery.main"]
CMD ["--standalone", "--all-namespaces"]
