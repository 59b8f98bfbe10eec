# The retrieval API (CPU). Build: docker build -t ssl-retrieval .   Run: docker compose up
# TORCH_INDEX_URL picks the PyTorch wheel index: CPU by default; the compose `trainer` service
# overrides it with a CUDA index for GPU training.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_PINS="torch==2.14.1 torchvision==0.29.1"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /data && chown app:app /data

WORKDIR /app
# torch first, in its own layer: it is by far the largest and changes least.
RUN pip install --index-url "$TORCH_INDEX_URL" $TORCH_PINS

COPY pyproject.toml README.md ./
COPY training ./training
COPY index ./index
COPY service ./service
# No `[embedded]` extra: in a container the database is the compose `mongo` service (MONGO_URI).
# `[s3]`: replicas on several machines can keep index versions in an object store (INDEX_STORAGE_URL).
RUN pip install '.[s3]'

USER app
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"
# The committed demo encoder serves until a refresh publishes a model trained on the catalogue.
CMD ["sh", "-c", "python -m service.demo --model-only && exec python -m service --host 0.0.0.0 --port 8000"]
