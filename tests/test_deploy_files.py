"""The Procfile, the Dockerfile and docker-compose.yml say the same thing.

Docker cannot run here, so these read the files the way Docker and compose would and
check what can be checked: the commands are the Procfile's, the image runs as a user with
collected static files and a healthcheck on /healthz, compose sets only variables that
settings.py reads and gives no secret a default, and compose's own `config` accepts the
file (when a compose tool is installed: `make test` installs Debian's docker-compose).
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.urls import resolve

from labs import views

ROOT = Path(__file__).resolve().parents[1]
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|KEY")
APP_SERVICES = ("web", "worker", "beat")
# Every variable compose must be given (its ${VAR:?…} substitutions), with a dummy value.
REQUIRED = {
    "SECRET_KEY": "x" * 50,
    "ALLOWED_HOSTS": "stratus.example.edu",
    "CSRF_TRUSTED_ORIGINS": "https://stratus.example.edu",
    "SITE_URL": "https://stratus.example.edu",
    "POSTGRES_PASSWORD": "not-a-real-password",
    "REDIS_PASSWORD": "not-a-real-redis-password",
    "EMAIL_HOST": "smtp.example.edu",
}


def procfile() -> dict[str, str]:
    processes = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = command.strip()
    return processes


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, rest = current.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def expand(command: str, **env: str) -> list[str]:
    """A Procfile line as the shell would run it: ${VAR:-default} filled in."""

    def value(match: re.Match) -> str:
        return env.get(match[1], match[2])

    return shlex.split(re.sub(r"\$\{(\w+):-([^}]*)\}", value, command))


def in_image(argv: list[str]) -> list[str]:
    """The image has no .venv: its tools are on PATH."""
    return [arg.removeprefix(".venv/bin/") for arg in argv]


def settings_variables() -> set[str]:
    source = (ROOT / "portal" / "settings.py").read_text()
    return set(re.findall(r"\benv_\w+\(\s*\"([A-Z0-9_]+)\"", source))


def test_the_procfile_runs_web_worker_and_beat():
    assert set(procfile()) == {"web", "worker", "beat"}
    assert "--no-access-log" in procfile()["web"]  # the request line is Stratus' own


def test_the_image_runs_the_procfile_web_process_listening_inside_the_container():
    [cmd] = [json.loads(args) for keyword, args in dockerfile() if keyword == "CMD"]

    # Inside the container it listens on every interface; compose publishes it on loopback.
    assert cmd == in_image(expand(procfile()["web"], WEB_HOST="0.0.0.0"))  # noqa: S104
    # The frame limit uvicorn enforces is the consumer's (docs/console.md).
    assert cmd[cmd.index("--ws-max-size") + 1] == str(settings.CONSOLE_MAX_FRAME)


def test_the_image_runs_as_an_unprivileged_user_with_collected_static_files():
    instructions = dockerfile()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert any("manage.py collectstatic --no-input" in run for run in runs)
    keywords = [keyword for keyword, _ in instructions]
    assert keywords.index("USER") < keywords.index("CMD")


def test_the_image_healthcheck_asks_healthz_with_an_allowed_host_name():
    [check] = [args for keyword, args in dockerfile() if keyword == "HEALTHCHECK"]
    command = json.loads(check.partition("CMD")[2])
    assert command == ["python", "scripts/healthcheck.py"]
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import healthcheck
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    assert healthcheck.URL.endswith("/healthz")
    assert resolve("/healthz").func is views.healthz
    assert healthcheck.host_header("stratus.example.edu,www.example.edu") == "stratus.example.edu"
    assert healthcheck.host_header(".example.edu") == "example.edu"
    assert healthcheck.host_header("*") == healthcheck.host_header("") == "localhost"


def run_healthcheck(port: int, allowed_hosts: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "healthcheck.py")],
        env={**os.environ, "WEB_PORT": str(port), "ALLOWED_HOSTS": allowed_hosts},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_healthcheck_passes_against_a_live_site_and_fails_when_it_is_down(live_server):
    port = int(live_server.url.rsplit(":", 1)[1])

    assert run_healthcheck(port, "localhost").returncode == 0
    # Django refuses a Host it does not serve (400): that is why the check names one.
    assert run_healthcheck(port, "elsewhere.example.edu").returncode == 1
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = run_healthcheck(closed.getsockname()[1], "localhost")
    assert down.returncode == 1 and "healthcheck:" in down.stderr


def test_compose_runs_the_procfile_processes_from_the_one_image():
    services = compose()["services"]
    processes = procfile()

    assert {*APP_SERVICES, "redis", "postgres"} <= set(services)
    assert "command" not in services["web"]  # the image's CMD, checked above
    for name in ("worker", "beat"):
        assert services[name]["command"] == processes[name].replace(".venv/bin/", "")
    for name in APP_SERVICES:
        assert services[name]["build"] == "."
    # The one-off migration is the only other command the image runs.
    extra = {n for n, s in services.items() if "build" in s} - set(APP_SERVICES)
    assert extra == {"migrate"}
    assert services["migrate"]["command"] == "python manage.py migrate --no-input"


def test_compose_starts_the_app_once_redis_and_postgres_are_healthy():
    services = compose()["services"]
    for name in ("redis", "postgres"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    for name in APP_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_compose_publishes_only_the_web_port_and_only_on_loopback():
    services = compose()["services"]
    published = {name: s.get("ports", []) for name, s in services.items() if s.get("ports")}
    assert set(published) == {"web"}
    assert all(str(port).startswith("127.0.0.1:") for port in published["web"])


def test_compose_sets_only_variables_that_settings_reads():
    read = settings_variables()
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "LOG_FORMAT"} <= read  # the parser works
    read.add("WEB_CONCURRENCY")  # uvicorn's own: its number of worker processes
    for name in APP_SERVICES:
        unknown = set(compose()["services"][name]["environment"]) - read
        assert not unknown, f"{name} sets variables settings.py never reads: {unknown}"


def test_no_secret_in_compose_has_a_default():
    text = (ROOT / "docker-compose.yml").read_text()
    substitutions = re.findall(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", text)
    for name, operator, default in substitutions:
        if SECRET_NAME.search(name):
            # Required (":?message"), or optional and empty (no SMTP login, say).
            assert operator == ":?" or (operator == ":-" and default == ""), name
    for key in ("SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        assert re.search(rf"\$\{{{key}:\?", text), f"{key} must be required"
    for service in compose()["services"].values():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                assert "${" in str(value), f"{key} has a literal value in compose"


def compose_tool() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        plugin = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if plugin.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def compose_config(tmp_path, *, quiet: bool = True, **env: str) -> subprocess.CompletedProcess:
    tool = compose_tool()
    if tool is None:
        pytest.skip(
            "no compose tool (docker compose plugin or docker-compose) is installed; "
            "`make test` installs Debian's docker-compose"
        )
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    return subprocess.run(
        [
            *tool,
            "--env-file",
            str(empty_env_file),  # never a developer's own .env
            "-f",
            str(ROOT / "docker-compose.yml"),
            "config",
            *(["-q"] if quiet else []),
        ],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_compose_config_accepts_the_file(tmp_path):
    result = compose_config(tmp_path, **REQUIRED)

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "missing", ["SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "EMAIL_HOST"]
)
def test_compose_refuses_to_start_without_a_required_variable(tmp_path, missing):
    env = {k: v for k, v in REQUIRED.items() if k != missing}

    result = compose_config(tmp_path, **env)

    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def redis_password_of(url: str) -> str | None:
    return urllib.parse.urlsplit(url).password


def test_redis_asks_every_client_for_the_password_the_app_services_use(tmp_path):
    # Console tickets and Celery tasks live in Redis: without a password, anything that
    # reaches its port could mint a console ticket or queue an operation.
    result = compose_config(tmp_path, quiet=False, **REQUIRED)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    password = REQUIRED["REDIS_PASSWORD"]

    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == password
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == password  # its healthcheck
    for name in (*APP_SERVICES, "migrate"):
        url = services[name]["environment"]["REDIS_URL"]
        assert redis_password_of(url) == password, name


# What an operator keeps beside docker-compose.yml: compose's variable file, the worker's
# SSH key pair for qemu+ssh:// hosts (docs/deploy.md, STRATUS_SSH_DIR=./ssh), and var/
# (the development secret key, SQLite, the demo's SSH key).
SECRET_FILES = [
    ".env",
    ".env.production",
    "ssh/id_ed25519",
    "ssh/id_ed25519.pub",
    "ssh/known_hosts",
    "var/dev-secret-key",
    "var/stratus.sqlite3",
]


def docker_ignored(path: str) -> bool:
    """Whether `docker build` leaves PATH out of the context, by .dockerignore's rules:
    patterns anchored at the context root, `*` within one path element, `**` across
    them, a match on a directory excludes what is under it, the last matching line wins
    (`!` re-includes)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("path", SECRET_FILES)
def test_the_image_never_contains_the_operators_secrets(path):
    assert docker_ignored(path), f"COPY . . would bake {path} into the image"


def test_the_image_keeps_the_code_it_runs():
    for path in ("manage.py", "labs/models.py", "static/js/live.js", "templates/base.html"):
        assert not docker_ignored(path), path


@pytest.mark.parametrize("path", SECRET_FILES)
def test_git_never_offers_to_commit_the_operators_secrets(path):
    result = subprocess.run(
        ["git", "check-ignore", "--quiet", "--no-index", path],  # noqa: S607
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, f"git would commit {path}"
