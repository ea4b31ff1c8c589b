# Web and worker image for Stratus (the same image runs `web`, `worker` and `beat`; see
# Procfile). Hypervisor workers need libvirt's client library and reach libvirtd through
# the Host's URI (qemu+ssh://…); the web process never talks to libvirt.
FROM python:3.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBUG=false
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc openssh-client \
       qemu-utils nodejs npm \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt package.json package-lock.json ./
RUN pip install --no-cache-dir -r requirements.txt \
    && npm ci --no-audit --no-fund --ignore-scripts
COPY . .
# collectstatic needs a key but uses nothing secret; the real one comes at run time.
RUN SECRET_KEY=collectstatic-only python manage.py collectstatic --no-input \
    && useradd --system --home /app stratus && chown -R stratus /app/var
USER stratus

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["python", "-m", "uvicorn", "portal.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--ws-max-size", "262144", "--ws-per-message-deflate", "false"]
