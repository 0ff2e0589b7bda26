# channel-canary: `probe run` in a slim Python image, as a non-root user (UID/GID 10001).
#
#   docker build -t channel-canary:0.1.0 .
#   docker run --rm -p 9465:9465 --env-file deploy/kubernetes/canary.env \
#     -v "$PWD/secrets:/run/secrets/channel-canary:ro" channel-canary:0.1.0
#
# Mounts (read-only):
#   /etc/channel-canary/config.toml  the config; the image holds deploy/kubernetes/config.toml there (secrets read
#                                    from files, the rest from the environment: deploy/kubernetes/canary.env)
#   /run/secrets/channel-canary/     the secret files that config's `*_file` keys name (database-url,
#                                    twilio-auth-token, gmail-authorized-user.json, llm-api-key, redis-url:
#                                    deploy/kubernetes/secret.example.yaml); -e CANARY_SECRETS_DIR=… moves them
#   --web.config.file FILE           optional exporter-toolkit web config (TLS, basic auth): mount it and add the flag
# Writable: /var/lib/channel-canary, the config's state_dir (the ledger of synthetic tickets to remove after a crash,
# the uptime history). With a read-only root file system mount a volume there (-v canary-state:/var/lib/channel-canary);
# the canary writes nothing else (bytecode is compiled at build time).
# SIGHUP reloads the config; SIGTERM stops it within shutdown_grace + cleanup_timeout (20 s with the defaults).

# Builder: build our wheel and install it with its dependencies into a virtualenv (every dependency has a binary
# wheel for linux/amd64 and arm64, so no compiler is needed here either; the final stage has none in any case).
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/channel-canary
COPY pyproject.toml README.md ./
COPY canary/ canary/
COPY probes/ probes/
COPY exporter/ exporter/
RUN /opt/channel-canary/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/channel-canary/bin/pip install /wheels/*.whl \
    && /opt/channel-canary/bin/python -m compileall -q /opt/channel-canary/lib

# Final: the virtualenv on the same Python image, no build tools, a fixed non-root user.
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 canary \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin canary \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/channel-canary
COPY --from=builder /opt/channel-canary /opt/channel-canary
COPY deploy/kubernetes/config.toml /etc/channel-canary/config.toml
ENV PATH=/opt/channel-canary/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CANARY_CONFIG=/etc/channel-canary/config.toml
WORKDIR /etc/channel-canary
USER 10001:10001
EXPOSE 9465
STOPSIGNAL SIGTERM
ENTRYPOINT ["probe"]
CMD ["run", "--config", "/etc/channel-canary/config.toml", "--listen", "0.0.0.0:9465"]
