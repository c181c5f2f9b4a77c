# tiergate: OpenAI-compatible LLM routing sidecar.
#   docker build -t tiergate .
#   docker run -p 8100:8100 -e TIERGATE_API_KEYS=... -e OPENROUTER_API_KEY=... \
#     -v $PWD/routes.yaml:/etc/tiergate/routes.yaml:ro -e TIERGATE_CONFIG=/etc/tiergate/routes.yaml tiergate
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layer: only a change to pyproject.toml rebuilds it.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package, installed as a user installs it (a wheel, not editable): the embedded tables and SQL
# migrations travel inside it as package data. The source is removed afterwards, so nothing is
# imported from it. A mounted table is named by TIERGATE_CONFIG.
COPY pyproject.toml README.md /tmp/tiergate-src/
COPY proxy /tmp/tiergate-src/proxy
RUN pip install --no-deps /tmp/tiergate-src \
    && rm -rf /tmp/tiergate-src \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tiergate

USER 10001

# In a container the port must be reachable from outside it, so tiergate binds 0.0.0.0; it then
# refuses to start without TIERGATE_API_KEYS (pass --insecure only on a private network).
ENV TIERGATE_HOST=0.0.0.0 \
    TIERGATE_PORT=8100
EXPOSE 8100

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TIERGATE_PORT', '8100') + '/health', timeout=2)"]

ENTRYPOINT ["tiergate"]
CMD ["serve", "--host", "0.0.0.0"]
