# One image for every role: `duet cloud`, `duet devices`, `duet run`.
FROM python:3.11-slim
WORKDIR /app
# torch first and pinned. On x86_64 the default index serves a CUDA build;
# pass --build-arg TORCH_INDEX=<a CPU wheel index> for a CPU-only image.
ARG TORCH_INDEX=""
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url $TORCH_INDEX} torch==2.13.0 \
 && pip install --no-cache-dir --no-deps recbole==1.2.1
COPY pyproject.toml README.md ./
COPY duet_bus ./duet_bus
COPY devices ./devices
COPY cloud ./cloud
RUN pip install --no-cache-dir .
ENTRYPOINT ["duet"]
