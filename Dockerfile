# syntax=docker/dockerfile:1
# The coordinator image: `fedctl coordinator serve`, CPU-only torch, a non-root user.
#
#   docker build -t fedcoord:0.1.0 .
#   docker run --rm -p 7070:7070 -p 8080:8080 -v "$PWD/certs:/etc/fedcoord/tls:ro" \
#       -e FEDCOORD_TLS=/etc/fedcoord/tls fedcoord:0.1.0
#
# Everything is downloaded here, at build time; the running container fetches nothing.
# deploy/README.md tells how to run it on Kubernetes (deploy/kubernetes).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fedcoord
ENV PATH=/opt/fedcoord/bin:$PATH
# torch first, from the CPU index and pinned like the Makefile's TORCH: a bare `torch` from
# PyPI pulls the CUDA build (gigabytes of libraries a coordinator never uses).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY core ./core
COPY coordinator ./coordinator
COPY device_agent ./device_agent
COPY fedctl ./fedctl
COPY simulations ./simulations
COPY fedcoord ./fedcoord
# postgres: the psycopg driver for --db postgresql://...
RUN pip install '.[postgres]' \
    && pip check \
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__" \
    && fedctl coordinator serve --help > /dev/null

FROM ${PYTHON_IMAGE}
# A fixed uid/gid, so Kubernetes' runAsUser/fsGroup (deploy/kubernetes) name the same user.
RUN groupadd --system --gid 10001 fedcoord \
    && useradd --system --uid 10001 --gid fedcoord --home-dir /var/lib/fedcoord \
       --shell /usr/sbin/nologin fedcoord \
    && install -d -o fedcoord -g fedcoord -m 0750 /var/lib/fedcoord /var/lib/fedcoord/store
COPY --from=build /opt/fedcoord /opt/fedcoord
# FEDCOORD_<KEY> variables are the serve command's defaults here (flags and --config file
# values override them; see `fedctl coordinator serve --help`). Plaintext on 0.0.0.0 is
# refused: give TLS (FEDCOORD_TLS=DIR with server.crt and server.key) or --insecure.
# FEDCOORD_HTTP_PORT: the /healthz, /readyz and /metrics side port (read once serve has it).
# MPLCONFIGDIR and XDG_CACHE_HOME point into /tmp, so a read-only root filesystem works.
ENV PATH=/opt/fedcoord/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    FEDCOORD_HOST=0.0.0.0 \
    FEDCOORD_PORT=7070 \
    FEDCOORD_HTTP_PORT=8080 \
    FEDCOORD_STORE=/var/lib/fedcoord/store \
    FEDCOORD_DB=sqlite:////var/lib/fedcoord/fedcoord.db
USER 10001:10001
WORKDIR /var/lib/fedcoord
# 7070: gRPC (devices and fedctl, one port). 8080: HTTP /healthz, /readyz, /metrics.
EXPOSE 7070 8080
ENTRYPOINT ["fedctl", "coordinator", "serve"]
