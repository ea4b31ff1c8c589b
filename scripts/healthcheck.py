"""Container healthcheck for the web process: GET /healthz on the local port.

Exit 0 when the site answers 200 (the process and its database are up), 1 otherwise.
Standard library only, so it runs in the image without Django being imported.

The request names a host from ALLOWED_HOSTS: with DEBUG off Django answers 400 to any
other Host header, including the 127.0.0.1 the check connects to.
"""

import os
import sys
import urllib.error
import urllib.request

URL = "http://127.0.0.1:{port}/healthz"


def host_header(allowed_hosts: str) -> str:
    """The first usable name in ALLOWED_HOSTS ('.example.edu' → 'example.edu')."""
    for name in allowed_hosts.split(","):
        name = name.strip().lstrip(".")
        if name and name != "*":
            return name
    return "localhost"


def main() -> int:
    url = URL.format(port=os.environ.get("WEB_PORT", "8000"))
    request = urllib.request.Request(  # noqa: S310 - a fixed http:// URL on loopback
        url, headers={"Host": host_header(os.environ.get("ALLOWED_HOSTS", ""))}
    )
    try:
        with urllib.request.urlopen(request, timeout=4) as response:  # noqa: S310
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"healthcheck: {url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
