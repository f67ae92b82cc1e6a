# One image for every service (migrate, worker; api and flower later).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# torch from PyPI carries CUDA; pin TORCH_SPEC to match the hosts' drivers.
ARG TORCH_SPEC=torch
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY completion_queue ./completion_queue
COPY db ./db
COPY producer ./producer
COPY workers ./workers
RUN pip install ".[worker]"
ENV CQ_DATA_DIR=/data
VOLUME /data
CMD ["cq", "--help"]
