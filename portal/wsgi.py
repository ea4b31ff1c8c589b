"""WSGI entry point: pages and forms only, for a WSGI server measured beside the ASGI one
(bench/pages.py --server; docs/performance.md). Websockets (/ws/) need ``portal.asgi``."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
application = get_wsgi_application()
