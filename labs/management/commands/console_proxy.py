"""Run the websockify console proxy on a hypervisor (docs/console-client.md).

python manage.py console_proxy --listen 127.0.0.1:6080 --host h1
"""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from labs.consoles import websockify as console_proxy


def listen_address(value: str) -> tuple[str, int]:
    """ "127.0.0.1:6080", "[::1]:6080" or "6080" (loopback) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"--listen {value!r}: expected HOST:PORT")
    return host, int(port)


class Command(BaseCommand):
    help = "Serve VM consoles over websockify, taking Stratus tickets from the subprotocol."

    def add_arguments(self, parser):
        parser.add_argument("--listen", default="127.0.0.1:6080", help="HOST:PORT to listen on")
        parser.add_argument(
            "--host",
            required=True,
            help="the Stratus host (its name) this proxy runs beside: it serves that host's "
            "VMs, whatever the host's libvirt URI, and no other host's",
        )
        parser.add_argument(
            "--allowed-origin",
            action="append",
            dest="allowed_origins",
            metavar="URL",
            help="an origin browsers may connect from (repeatable); "
            "default: SITE_URL and CSRF_TRUSTED_ORIGINS",
        )
        parser.add_argument(
            "--allow-without-session",
            action="store_true",
            help="accept a ticket without the portal's session cookie (a proxy on another "
            "site, where the browser does not send it)",
        )
        parser.add_argument(
            "--recheck",
            type=int,
            default=console_proxy.RECHECK_SECONDS,
            metavar="SECONDS",
            help="how often a running session re-checks access and its time limits",
        )
        parser.add_argument(
            "--max-connections",
            type=int,
            default=settings.CONSOLE_PROXY_MAX_CONNECTIONS,
            metavar="N",
            help="connections served at once (one process each); more get HTTP 503 "
            "(default: CONSOLE_PROXY_MAX_CONNECTIONS)",
        )
        parser.add_argument(
            "--header-timeout",
            type=int,
            default=settings.CONSOLE_PROXY_HEADER_TIMEOUT,
            metavar="SECONDS",
            help="seconds a client has to send its whole HTTP request "
            "(default: CONSOLE_PROXY_HEADER_TIMEOUT)",
        )
        parser.add_argument("--cert", default="", help="TLS certificate (PEM) for wss://")
        parser.add_argument("--key", default="", help="TLS key, if not in the certificate")
        parser.add_argument(
            "--ssl-only", action="store_true", help="refuse connections without TLS"
        )

    def handle(self, *args, **options):
        host, port = listen_address(options["listen"])
        if options["ssl_only"] and not options["cert"]:
            raise CommandError("--ssl-only needs --cert")
        if options["recheck"] < 1:
            raise CommandError("--recheck must be at least 1 second")
        if options["max_connections"] < 1:
            raise CommandError("--max-connections must be at least 1")
        if options["header_timeout"] < 1:
            raise CommandError("--header-timeout must be at least 1 second")

        origins = options["allowed_origins"]
        server = console_proxy.proxy_server(
            listen_host=host,
            listen_port=port,
            host_name=options["host"],
            allowed_origins=origins,
            require_session=not options["allow_without_session"],
            cert=options["cert"],
            key=options["key"],
            ssl_only=options["ssl_only"],
            recheck_seconds=options["recheck"],
            max_connections=options["max_connections"],
            header_timeout=options["header_timeout"],
        )
        scheme = "wss" if options["cert"] else "ws"
        allowed = ", ".join(sorted(server.token_plugin.allowed_origins)) or "any"
        self.stdout.write(
            f"console proxy on {scheme}://{options['listen']} "
            f"(VMs on {options['host']}; origins: {allowed}; "
            f"session cookie {'optional' if options['allow_without_session'] else 'required'})"
        )
        self.stdout.flush()
        console_proxy.proxy_run(server)
