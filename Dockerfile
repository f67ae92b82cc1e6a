# One image for every cq service: migrate, api, flower, worker.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# torch from PyPI carries CUDA; pin TORCH_SPEC to match the hosts' drivers.
ARG TORCH_SPEC=torch
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md constraints.txt ./
COPY completion_queue ./completion_queue
COPY db ./db
COPY workers ./workers
COPY producer ./producer
COPY api ./api
COPY bench ./bench
COPY cli ./cli
# Every extra: the same image runs the worker, the API and Flower; at the tested releases.
RUN pip install -c constraints.txt ".[all]"
ENV CQ_DATA_DIR=/data
VOLUME /data
# Flower, and the worker's Prometheus /metrics.
EXPOSE 5555 9100
CMD ["cq", "--help"]
