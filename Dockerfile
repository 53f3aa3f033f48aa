# syntax=docker/dockerfile:1
# Pipeswitch media server. Slim, non-root, read-only root filesystem friendly:
#   docker build -t pipeswitch .                                  # cloud providers (keys via env)
#   docker build --build-arg WITH_LOCAL_MODELS=1 --build-arg PROVIDERS=local -t pipeswitch:local .
#                                                  # + the embedded offline models (no keys, ~1.5 GB)
# Writable paths are only /var/cache/pipeswitch (volume: joined model weights, Piper cache) and
# /tmp (tmpfs: Prometheus multiprocess samples, model server scratch). Run with --read-only.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG WITH_LOCAL_MODELS=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE LICENSE-NOTES.md ./
COPY config/ config/
COPY pipelines/ pipelines/
COPY transports/ transports/
COPY processors/ processors/
COPY bench/ bench/
COPY sql/ sql/
RUN python -m venv /opt/pipeswitch \
 && /opt/pipeswitch/bin/pip install --upgrade pip \
 && if [ "$WITH_LOCAL_MODELS" = "1" ]; then EXTRAS="[local,otel]"; else EXTRAS="[otel]"; fi \
 && /opt/pipeswitch/bin/pip install ".${EXTRAS}" \
 && find /opt/pipeswitch -name '__pycache__' -prune -exec rm -rf {} +

FROM python:${PYTHON_VERSION}-slim
# real: cloud providers, keys from the environment; local: the offline models (needs them built in)
ARG PROVIDERS=real
LABEL org.opencontainers.image.title="pipeswitch" \
      org.opencontainers.image.description="AI voice agents for FreeSWITCH/FusionPBX (mod_audio_stream + Pipecat)" \
      org.opencontainers.image.licenses="BSD-2-Clause"
RUN groupadd --system --gid 10001 pipeswitch \
 && useradd --system --uid 10001 --gid pipeswitch --home-dir /var/lib/pipeswitch \
      --no-create-home --shell /usr/sbin/nologin pipeswitch \
 && mkdir -p /var/cache/pipeswitch /var/lib/pipeswitch \
 && chown pipeswitch:pipeswitch /var/cache/pipeswitch /var/lib/pipeswitch
COPY --from=build /opt/pipeswitch /opt/pipeswitch
ENV PATH=/opt/pipeswitch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/pipeswitch \
    HF_HUB_OFFLINE=1 \
    PIPESWITCH_HOST=0.0.0.0 \
    PIPESWITCH_PORT=8080 \
    PIPESWITCH_CACHE_DIR=/var/cache/pipeswitch \
    PIPESWITCH_LOG_JSON=true \
    PIPESWITCH_DRAIN_TIMEOUT_SECS=30
# Keys come from the environment at run time (Kubernetes Secrets, an env file), never the image.
ENV PIPESWITCH_PROVIDERS=${PROVIDERS}
USER 10001:10001
WORKDIR /var/lib/pipeswitch
VOLUME ["/var/cache/pipeswitch"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('PIPESWITCH_PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["pipeswitch"]
CMD ["serve"]
