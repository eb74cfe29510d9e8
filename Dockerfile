# tiller: one replica of the CPU inference server. It serves tiller's built-in model (package
# data) unless MODEL names a file mounted read-only at /models (and TOKENIZER a llama2.c
# tokenizer.bin beside it, for .bin models); docker-compose.yml passes them through.
#
#   docker build -t tiller .
#   docker run --rm -p 8080:8080 -v tiller-cache:/cache tiller --parallel 4 --threads 4
#   docker run --rm -p 8080:8080 -v "$PWD/models:/models:ro" -v tiller-cache:/cache \
#       -e MODEL=stories15M.bin -e TOKENIZER=tokenizer.bin tiller --parallel 4 --threads 4
#
# Arguments after the image name are passed to `tiller serve` (see `tiller serve --help`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY tiller tiller
COPY engine engine
COPY server server
RUN pip install . && rm -rf /src

# NOTE: kernels can only be compiled with a model loaded, so the first start of a replica
# compiles them (seconds to a minute). They are cached under $XDG_CACHE_HOME/tiller/numba/
# <version>-<source hash>: on a volume, restarts and the other replicas reuse them, and a new
# image (new source) gets a fresh directory instead of stale kernels. (Setting NUMBA_CACHE_DIR
# instead would skip that source hash.)
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent tiller \
    && mkdir -p /cache /models && chown tiller:tiller /cache
ENV XDG_CACHE_HOME=/cache \
    MODEL= \
    TOKENIZER= \
    API_KEY=
VOLUME ["/cache"]
USER tiller
WORKDIR /
EXPOSE 8080

# /health is 503 while the model loads and compiles, 200 once it serves.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]

# exec: tiller is PID 1, so `docker stop` reaches it as SIGTERM and it shuts down cleanly
# (open requests get up to 10 s). API_KEY, when set, is required as a bearer token on every
# route but /health, /v1/models and /models.
ENTRYPOINT ["/bin/sh", "-c", "exec tiller serve --host 0.0.0.0 --port 8080 ${MODEL:+--model \"/models/$MODEL\"} ${TOKENIZER:+--tokenizer \"/models/$TOKENIZER\"} ${API_KEY:+--api-key \"$API_KEY\"} \"$@\"", "tiller"]
CMD []
