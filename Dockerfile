# Web and worker image for Stratus: the same image runs `web` (the default command),
# `worker` and `beat` (see Procfile and docker-compose.yml; docs/deploy.md). Workers reach
# libvirtd through each Host's URI (qemu+ssh://…, hence openssh-client); the web process
# never talks to libvirt.
FROM python:3.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBUG=false
# libvirt-dev, pkg-config and gcc build libvirt-python; nodejs and npm install noVNC.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc openssh-client \
       qemu-utils nodejs npm \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt package.json package-lock.json ./
RUN pip install --no-cache-dir -r requirements.txt \
    && npm ci --no-audit --no-fund --ignore-scripts
COPY . .
# collectstatic needs a key but uses nothing secret; the real one comes at run time. It
# sends no mail either, so it may start without EMAIL_HOST (portal/settings.py refuses
# that at run time). The app runs as an unprivileged user that owns only var/ (beat's
# schedule file).
RUN SECRET_KEY=collectstatic-only ALLOW_LOCAL_EMAIL_BACKEND=true \
       python manage.py collectstatic --no-input \
    && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home stratus \
    && chown -R stratus:stratus /app/var
USER stratus

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "scripts/healthcheck.py"]
CMD ["python", "-m", "uvicorn", "portal.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--ws-max-size", "262144", "--ws-per-message-deflate", "false", "--no-access-log"]
