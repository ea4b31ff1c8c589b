"""Stratus settings. Everything that differs between machines comes from the environment.

See docs/configuration.md for the variables. With nothing set, Stratus runs as a local
development site: DEBUG on, SQLite, console email, Redis on loopback.
"""

from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

from portal.env import dev_secret_key, env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", default=True)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    # Development only: a random key kept in var/ so sessions survive restarts.
    SECRET_KEY = dev_secret_key(BASE_DIR / "var" / "dev-secret-key")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# The address students follow in invitation emails, without a trailing slash.
SITE_URL = env_str("SITE_URL", "http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "axes",  # failed sign-ins counted per account and per address (django-axes)
    "labs",
]

MIDDLEWARE = [
    # First, so its one line per request times and sees everything (portal/logging.py).
    "portal.logging.RequestLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # A view that cannot reach the database answers 503 with a page that says so.
    "portal.middleware.DatabaseUnavailableMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last: it answers a locked-out sign-in
]

# Sign-in throttling: after LOGIN_FAILURE_LIMIT failed attempts for one account, or from
# one address, sign-ins from there wait LOGIN_COOLOFF_MINUTES (a success resets the count).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_ENABLED = env_bool("AXES_ENABLED", True)
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
# Console tickets and password-reset mails per account and per address (labs/throttle.py).
TICKETS_PER_MINUTE = env_int("TICKETS_PER_MINUTE", 30)
RESETS_PER_HOUR = env_int("RESETS_PER_HOUR", 5)

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = None
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite by default, anything dj-database-url understands via DATABASE_URL.
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Under ASGI every request runs its sync code in a thread of its own, so persistent
        # connections pile up one per thread until PostgreSQL refuses ("too many clients
        # already" under bench/pages.py). One pool per process instead (psycopg_pool).
        # A restarted PostgreSQL leaves the pool holding dead connections: ``check`` tests
        # each one as it is handed out (an empty query) and replaces a dead one, so the
        # first requests after the restart are served, not failed. While the database is
        # away a request waits at most DATABASE_POOL_TIMEOUT for a connection, then gets
        # the 503 of portal.middleware (tests/integration/test_postgres_restart.py).
        from psycopg_pool import ConnectionPool

        options = DATABASES["default"].setdefault("OPTIONS", {})
        options.setdefault("connect_timeout", 5)  # a host that does not answer at all
        options["pool"] = {
            "min_size": 1,
            "max_size": env_int("DATABASE_POOL_SIZE", 10),
            "timeout": env_int("DATABASE_POOL_TIMEOUT", 10),
            "check": ConnectionPool.check_connection,
        }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("SQLITE_PATH", str(BASE_DIR / "var" / "stratus.sqlite3")),
            # IMMEDIATE takes the write lock when a transaction starts, so concurrent
            # writers queue behind each other (timeout in seconds) instead of failing.
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
            "TEST": {"NAME": env_str("SQLITE_TEST_PATH", str(BASE_DIR / "var" / "test.sqlite3"))},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

# Channels' layer carries console revocations and live events from workers to the web
# processes, so it is Redis (the in-memory layer would not cross processes).
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {
            "hosts": [env_str("CHANNEL_LAYER_URL", REDIS_URL)],
            # Separates deployments (and test runs) that share one Redis.
            "prefix": env_str("CHANNEL_LAYER_PREFIX", "stratus"),
        },
    }
}

# Live pages (docs/live-updates.md): changes within this window are rendered and pushed once.
LIVE_COALESCE_MS = env_int("LIVE_COALESCE_MS", 100)

# Rendered page parts between the changes that touch them (labs/live/pagecache.py): in
# Redis, so that a worker's change reaches every web process. What changes with the clock
# alone is at most PAGE_CACHE_SECONDS old; 0 renders every page from the database.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": env_str("CACHE_URL", REDIS_URL),
        "TIMEOUT": 300,
        # A Redis that does not answer must not hold a page up: it renders uncached.
        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
    }
}
PAGE_CACHE_SECONDS = env_int("PAGE_CACHE_SECONDS", 30)
PAGE_CACHE_PREFIX = env_str("PAGE_CACHE_PREFIX", "stratus:pages:")

# Browser consoles (labs/consoles/tickets.py, labs/consumers.py).
CONSOLE_TICKET_TTL = env_int("CONSOLE_TICKET_TTL", 30)  # seconds; at most 60
CONSOLE_IDLE_TIMEOUT = env_int("CONSOLE_IDLE_TIMEOUT", 30 * 60)  # no input from the browser
CONSOLE_MAX_SESSION = env_int("CONSOLE_MAX_SESSION", 8 * 3600)  # absolute limit
CONSOLE_MAX_FRAME = env_int("CONSOLE_MAX_FRAME", 256 * 1024)  # bytes per websocket message
# The web process's SSH key for console channels to other hosts (labs/consoles/tunnel.py;
# used only for hosts with a `console_ssh` address).
CONSOLE_SSH_KEY = env_str("CONSOLE_SSH_KEY", str(BASE_DIR / "ssh" / "console_ed25519"))
if not 1 <= CONSOLE_TICKET_TTL <= 60:
    raise ImproperlyConfigured("CONSOLE_TICKET_TTL must be between 1 and 60 seconds")
# Sockets one user may hold open at once (labs/consoles/leases.py), across every web
# process and console proxy: consoles (both transports together) and /ws/events/ tabs.
CONSOLE_MAX_PER_USER = env_int("CONSOLE_MAX_PER_USER", 4)
EVENTS_MAX_PER_USER = env_int("EVENTS_MAX_PER_USER", 20)
# The standalone console proxy (manage.py console_proxy): connections it serves at once
# (each is a process), and seconds a client has to send its whole HTTP request.
CONSOLE_PROXY_MAX_CONNECTIONS = env_int("CONSOLE_PROXY_MAX_CONNECTIONS", 64)
CONSOLE_PROXY_HEADER_TIMEOUT = env_int("CONSOLE_PROXY_HEADER_TIMEOUT", 5)
for _name in (
    "CONSOLE_MAX_PER_USER",
    "EVENTS_MAX_PER_USER",
    "CONSOLE_PROXY_MAX_CONNECTIONS",
    "CONSOLE_PROXY_HEADER_TIMEOUT",
):
    if globals()[_name] < 1:
        raise ImproperlyConfigured(f"{_name} must be at least 1")

# Celery. Operations are rows (labs.Operation); a task only carries the row's id.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = ("labs.compute.dispatch.route_task",)
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Workers and beat log through LOGGING below instead of Celery's own format.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Longer than the longest operation (a shutdown waits at most VM_SHUTDOWN_TIMEOUT, a
# provision or reset a few minutes), so Redis never hands a running task to a second
# worker. A worker killed mid-task has its operations re-queued when it starts again
# (labs.tasks.recover_orphans), without waiting for this timeout.
# A broker connection lost mid-task does not cancel the task (Celery 6 will default to
# cancelling): the operation needs only the database and the host to end, and ends its row
# itself; a cancelled one would stay `running` under a worker that is still alive, which
# recover_orphans does not touch. The unacked message comes back after the reconnect and
# claims nothing (tests/integration/test_chaos.py kills Redis under a running operation).
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600)
}
CELERY_BEAT_SCHEDULE = {
    "reconcile": {
        "task": "labs.tasks.reconcile_all",
        "schedule": env_int("RECONCILE_INTERVAL_SECONDS", 60),
    },
    # The outbox's sweeper: queued operations whose message was lost (or never sent,
    # the broker being away) are sent again (labs/compute/dispatch.py).
    "operations-resend": {
        "task": "labs.tasks.operations_resend",
        "schedule": env_int("RESEND_INTERVAL_SECONDS", 5),
        "options": {"expires": 10},
    },
    # The course clock: VMs ready before class, suspended or stopped after
    # (labs/compute/clock.py). A tick that waited too long is dropped: the next one acts.
    "course-clock": {
        "task": "labs.tasks.course_clock_tick",
        "schedule": env_int("COURSE_CLOCK_INTERVAL_SECONDS", 60),
        "options": {"expires": 50},
    },
    # The deadline's final snapshots and the end of term (labs/compute/term.py).
    "term": {
        "task": "labs.tasks.term_tick",
        "schedule": env_int("COURSE_CLOCK_INTERVAL_SECONDS", 60),
        "options": {"expires": 50},
    },
    # Idle machines: warned about, then suspended to disk (labs/compute/idle.py).
    "idle": {
        "task": "labs.tasks.idle_tick",
        "schedule": env_int("IDLE_INTERVAL_SECONDS", 60),
        "options": {"expires": 50},
    },
    # Usage hours: warned at 80 %, running VMs saved to disk at 100 % (labs/compute/usage.py).
    "usage-hours": {
        "task": "labs.tasks.usage_tick",
        "schedule": env_int("USAGE_INTERVAL_SECONDS", 300),
        "options": {"expires": 240},
    },
}

# VMs
STRATUS_IMAGE_DIR = env_str("STRATUS_IMAGE_DIR", "/var/lib/stratus/images")
# Course images (docs/storage.md): the largest virtual size an import or a capture may have,
# and whether a capture is stored compressed (smaller, slower; bench/images.py measures).
IMAGE_MAX_VIRTUAL_GIB = env_int("IMAGE_MAX_VIRTUAL_GIB", 64)
IMAGE_CAPTURE_COMPRESS = env_bool("IMAGE_CAPTURE_COMPRESS", False)
# The end of term's archives (labs/compute/term.py): <course>/<group>-<vm>.qcow2 and its
# manifest, written by the worker of the VM's host (docs/operations.md, Archives).
STRATUS_ARCHIVE_DIR = env_str("STRATUS_ARCHIVE_DIR", "/var/lib/stratus/archive")
# A shut-down holds a worker slot while the guest powers off: force it off after this.
VM_SHUTDOWN_TIMEOUT = env_int("VM_SHUTDOWN_TIMEOUT", 20)
# How long an SSH-access update waits for a guest's agent (a guest just started boots first).
GUEST_AGENT_TIMEOUT = env_int("GUEST_AGENT_TIMEOUT", 120)
# A private network per group (labs/compute/networks.py, docs/networking.md): on hosts
# whose ``group_networks`` is set, every VM gets a second NIC on its group's own segment.
# Each group gets one /24 of the pool; VXLAN between hosts uses a VNI per group.
GROUP_NETWORKS = env_bool("GROUP_NETWORKS", True)
GROUP_NETWORK_POOL = env_str("GROUP_NETWORK_POOL", "10.200.0.0/16")
GROUP_NETWORK_VNI_BASE = env_int("GROUP_NETWORK_VNI_BASE", 10000)
# How long a running guest may take to let a detached block volume go (seconds).
VOLUME_DETACH_TIMEOUT = env_int("VOLUME_DETACH_TIMEOUT", 30)
# Published ports (labs/compute/ports.py, docs/networking.md): a new course's defaults for
# how many guest ports a group may publish at once and which guest ports never are (22 is
# always refused: SSH is forwarded already).
PUBLISHED_PORTS_PER_GROUP = env_int("PUBLISHED_PORTS_PER_GROUP", 3)
PUBLISHED_PORTS_FORBIDDEN = [
    int(port) for port in env_list("PUBLISHED_PORTS_FORBIDDEN", ["22", "25"]) if port.isdigit()
]

# Shared files (labs/compute/shares.py, docs/storage.md): the group and course shares'
# directories, exported to guests with virtiofs. The same path on every hypervisor host and
# on the machine that runs the admin and `course_share_put` (one shared filesystem in
# production, mounted nosuid,nodev,noexec); a course's share holds at most the cap, one
# file put there at most the file limit (MiB).
STRATUS_SHARES_DIR = env_str("STRATUS_SHARES_DIR", "/var/lib/stratus/shares")
COURSE_SHARE_CAP_MIB = env_int("COURSE_SHARE_CAP_MIB", 2048)
SHARE_FILE_MAX_MIB = env_int("SHARE_FILE_MAX_MIB", 512)
# Operations one group's members may ask for in a minute (course staff are not counted).
OPERATIONS_PER_GROUP_PER_MINUTE = env_int("OPERATIONS_PER_GROUP_PER_MINUTE", 20)
# libvirt domains are named PREFIX<vm id>; the tests use their own prefix so they never
# touch a demo's or another run's domains on the same host.
STRATUS_DOMAIN_PREFIX = env_str("STRATUS_DOMAIN_PREFIX", "stratus-vm-")
# Test-only fault injection ("name:seconds,..."): a worker pauses at these points so a
# test can kill it mid-operation. Empty in every real deployment.
STRATUS_FAILPOINTS = env_str("STRATUS_FAILPOINTS")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Invitation links are password-reset links: give students a week to use them; a reset
# link for an account already in use lives a few hours (labs/people/tokens.py).
PASSWORD_RESET_TIMEOUT = env_int("INVITATION_TIMEOUT_SECONDS", 7 * 24 * 3600)
RESET_LINK_TIMEOUT_SECONDS = env_int("RESET_LINK_TIMEOUT_SECONDS", 3 * 3600)

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "labs:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
# noVNC comes from the npm registry (package.json; `npm ci` puts it in node_modules/) and is
# served as /static/novnc/..., never from a CDN and never copied into the repository.
STATICFILES_DIRS = [BASE_DIR / "static", ("novnc", BASE_DIR / "node_modules" / "@novnc" / "novnc")]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# Email: the console in development, SMTP when EMAIL_HOST is set.
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Stratus <stratus@localhost>")
_email_host = env_str("EMAIL_HOST")
if _email_host:
    MAILERS = {
        "default": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {
                "host": _email_host,
                "port": env_int("EMAIL_PORT", 587),
                "username": env_str("EMAIL_HOST_USER") or None,
                "password": env_str("EMAIL_HOST_PASSWORD") or None,
                "use_tls": env_bool("EMAIL_USE_TLS", default=True),
                "timeout": env_int("EMAIL_TIMEOUT", 30),
            },
        }
    }
else:
    MAILERS = {
        "default": {
            "BACKEND": env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
        }
    }
# Invitation emails carry password-set links. In production a backend that keeps mail on
# this machine would print them to the log (console), keep them in memory or files, or drop
# them without a word: refuse to start instead. Benchmarks and the image build, which send
# no mail, say so with ALLOW_LOCAL_EMAIL_BACKEND.
LOCAL_EMAIL_BACKENDS = {
    f"django.core.mail.backends.{name}.EmailBackend"
    for name in ("console", "locmem", "filebased", "dummy")
}
if (
    not DEBUG
    and MAILERS["default"]["BACKEND"] in LOCAL_EMAIL_BACKENDS
    and not env_bool("ALLOW_LOCAL_EMAIL_BACKEND", default=False)
):
    raise ImproperlyConfigured(
        f"With DEBUG off, email must leave this machine, but the backend is "
        f"{MAILERS['default']['BACKEND']} (invitation links would go to the log or nowhere): "
        "set EMAIL_HOST for SMTP, or EMAIL_BACKEND to one that delivers"
    )

# Security: strict by default when DEBUG is off (manage.py check --deploy stays clean).
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # the console and live pages read it for fetch() POSTs
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy on every response, DEBUG on or off (so a page that breaks under it
# breaks in development first). Scripts and styles come only from our own static files: no
# inline <script>, <style>, on…= handler or style= attribute anywhere (confirmations are
# static/js/confirm.js reading data-confirm; json_script blocks are data, not scripts).
# noVNC draws JPEG rectangles and its cursor from data: URLs; fetch() and the websockets
# are same-origin ('self' covers ws:/wss: to this host).
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", default=True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", default=True)
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # the container healthcheck speaks plain HTTP
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", default=False)
    if env_bool("BEHIND_TLS_PROXY", default=False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Logging (docs/configuration.md): one JSON object per line on stderr by default, or
# LOG_FORMAT=text for a person at a terminal (make run). One line per request
# (portal.logging.RequestLogMiddleware) and one per operation run (labs.tasks).
LOG_FORMAT = env_str("LOG_FORMAT", "json")
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or text, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "portal.logging.RequestIdFilter"}},
    "formatters": {
        "json": {"()": "portal.logging.JsonFormatter"},
        "text": {"()": "portal.logging.TextFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",  # stderr
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        # Everything goes through the root's one handler: Django's own console handler
        # would print its records a second time, in another format.
        "django": {"handlers": [], "level": "INFO", "propagate": True},
        # Its 4xx warnings repeat the request line; 5xx errors (with tracebacks) stay.
        "django.request": {"level": "ERROR"},
        # uvicorn's startup and error lines in the same format. Its access log stays off
        # (--no-access-log in the Procfile and the Dockerfile): the request line above is
        # the one line per request. Named here because configuring "uvicorn" would
        # otherwise reset its child logger and bring those lines back.
        "uvicorn": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        # Celery's "received" and "succeeded in" lines repeat the operation line.
        "celery.app.trace": {"level": "WARNING"},
        "celery.worker.strategy": {"level": "WARNING"},
        # asyncssh's eight lines per SSH connection (console channels, labs/consoles/
        # tunnel.py): the tunnel logs the one that matters, "console channel to … open".
        "asyncssh": {"level": "WARNING"},
    },
}
