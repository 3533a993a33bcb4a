# syntax=docker/dockerfile:1
#
# mcp-quota-proxy container images (deploy/DEPLOY.md, "Build the images"):
#
#   docker build -t mcp-quota-proxy:0.1.0 .                         # the proxy (default)
#   docker build --target demo-upstream -t mcp-quota-proxy-demo-upstream:0.1.0 .
#
# The proxy image holds Python and a virtualenv with the package and its runtime
# dependencies: no extras, no test tools, no compilers (binary wheels only). It runs as
# uid 10001 and writes only to /var/lib/mcp-quota-proxy (the usage spool: mount a volume)
# and TMPDIR=/tmp (mount a writable volume), so it runs with a read-only root filesystem:
#
#   docker run --read-only --tmpfs /tmp -v mqp-spool:/var/lib/mcp-quota-proxy \
#     -e REDIS_URL -e MQP_KEY_PEPPER -e STRIPE_SECRET_KEY -e STRIPE_WEBHOOK_SECRET \
#     --network container:<your MCP server> mcp-quota-proxy:0.1.0
#
# tests/integration/test_deploy.py runs the `build` stage's RUN steps in a scratch
# directory (same commands, paths mapped) and checks the runtime stage's USER, ENTRYPOINT
# and HEALTHCHECK.

ARG PYTHON_IMAGE=python:3.12-slim

# ---- build: a wheel of the package, then a virtualenv with it and its dependencies ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m pip wheel --no-deps --wheel-dir /wheels .
# --only-binary: every dependency comes as a wheel, nothing is compiled here or later.
RUN python -m venv /opt/mcp-quota-proxy \
 && /opt/mcp-quota-proxy/bin/pip install --only-binary=:all: /wheels/mcp_quota_proxy-*.whl

# ---- the example MCP server's dependencies (the `demo` extra: the official MCP SDK) ----------
FROM build AS build-demo
RUN /opt/mcp-quota-proxy/bin/pip install --only-binary=:all: \
      "$(ls /wheels/mcp_quota_proxy-*.whl)[demo]"

# ---- what both images share: no build tools, an unprivileged user, writable paths ------------
FROM ${PYTHON_IMAGE} AS runtime-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/mcp-quota-proxy/bin:$PATH \
    TMPDIR=/tmp \
    MQP_CONFIG=/etc/mcp-quota-proxy/config.yaml
RUN groupadd --system --gid 10001 mqp \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mqp \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/mcp-quota-proxy
# A relative spool.path (the built-in default is spool/usage.db) lands on the volume too.
WORKDIR /var/lib/mcp-quota-proxy

# ---- the example upstream: a small real MCP server (replace it with yours) -----------------
FROM runtime-base AS demo-upstream
COPY --from=build-demo /opt/mcp-quota-proxy /opt/mcp-quota-proxy
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "proxy.demo.upstream"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--stateless"]

# ---- the proxy (default target: the last stage) --------------------------------------------
FROM runtime-base AS runtime
COPY --from=build /opt/mcp-quota-proxy /opt/mcp-quota-proxy
# The container configuration (listen 0.0.0.0:8080, spool on the volume); Kubernetes mounts
# the ConfigMap over this directory.
COPY deploy/kubernetes/base/config.yaml /etc/mcp-quota-proxy/config.yaml
# Numeric, so the kubelet can verify runAsNonRoot.
USER 10001:10001
VOLUME ["/var/lib/mcp-quota-proxy"]
EXPOSE 8080
# For `docker run` (Kubernetes uses the Deployment's probes). No curl in slim: Python's
# urllib; urlopen raises (exit 1) on a refused connection, a timeout or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["mcp-quota-proxy"]
CMD ["serve"]
