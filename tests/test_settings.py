import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from portal.env import env_bool, env_int, env_list

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "k" * 20 + "Zq8#vN2@rT5!mW9$xB4%yC7^pL1&hJ6*",
    "ALLOWED_HOSTS": "stratus.example.edu",
    "CSRF_TRUSTED_ORIGINS": "https://stratus.example.edu",
    "SITE_URL": "https://stratus.example.edu",
    "SECURE_HSTS_PRELOAD": "true",
    "EMAIL_HOST": "smtp.example.edu",
}


def manage(*args, env):
    # The browser tests allow sync ORM calls beside Playwright's loop; production does not.
    # A variable given as None is unset.
    ignored = {*PRODUCTION, "DJANGO_ALLOW_ASYNC_UNSAFE", *env}
    clean = {k: v for k, v in os.environ.items() if k not in ignored}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **{k: v for k, v in env.items() if v is not None}},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_production_variables(tmp_path):
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_without_secret_key_refuses_to_start():
    env = {**PRODUCTION, "SECRET_KEY": ""}
    result = manage("check", env=env)
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_a_bad_boolean_names_the_variable(monkeypatch):
    monkeypatch.setenv("DEBUG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="DEBUG must be a boolean"):
        env_bool("DEBUG")


def test_a_bad_integer_names_the_variable(monkeypatch):
    monkeypatch.setenv("EMAIL_PORT", "twenty")
    with pytest.raises(ImproperlyConfigured, match="EMAIL_PORT must be an integer"):
        env_int("EMAIL_PORT", 25)


def test_lists_are_split_on_commas(monkeypatch):
    monkeypatch.setenv("ALLOWED_HOSTS", " a.example , b.example,,")
    assert env_list("ALLOWED_HOSTS") == ["a.example", "b.example"]


def test_logs_are_json_lines_unless_text_is_asked_for():
    show = "from django.conf import settings; print(settings.LOGGING['handlers']['console'])"

    default = manage("shell", "-c", show, env={"LOG_FORMAT": None})
    text = manage("shell", "-c", show, env={"LOG_FORMAT": "text"})

    assert "'formatter': 'json'" in default.stdout, default.stderr
    assert "'formatter': 'text'" in text.stdout, text.stderr


def test_an_unknown_log_format_names_the_variable():
    result = manage("check", env={"LOG_FORMAT": "xml"})

    assert result.returncode != 0
    assert "LOG_FORMAT must be json or text" in result.stderr


def test_postgresql_gets_a_connection_pool_and_no_connection_kept_per_thread():
    # Under ASGI each request's sync code runs in a thread of its own: connections kept
    # per thread piled up until PostgreSQL refused more (bench/pages.py, 50 clients).
    script = (
        "from django.conf import settings; db = settings.DATABASES['default']; "
        "print(db['CONN_MAX_AGE'], db['OPTIONS']['pool']['max_size'])"
    )
    result = manage(
        "shell",
        "--verbosity",
        "0",
        "-c",
        script,
        env={
            "DATABASE_URL": "postgres://stratus@db.example.edu/stratus",
            "DATABASE_POOL_SIZE": "7",
        },
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "7"]


@pytest.mark.parametrize(
    ("variables", "backend"),
    [
        ({"EMAIL_HOST": None}, "console"),  # nothing set: the development default
        (
            {
                "EMAIL_HOST": None,
                "EMAIL_BACKEND": "django.core.mail.backends.console.EmailBackend",
            },
            "console",
        ),
        (
            {"EMAIL_HOST": None, "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
            "locmem",
        ),
        (
            {
                "EMAIL_HOST": None,
                "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
            },
            "filebased",
        ),
        (
            {"EMAIL_HOST": None, "EMAIL_BACKEND": "django.core.mail.backends.dummy.EmailBackend"},
            "dummy",
        ),
    ],
)
def test_production_refuses_a_mail_backend_that_keeps_invitation_links_here(variables, backend):
    result = manage("check", env={**PRODUCTION, **variables})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert f"django.core.mail.backends.{backend}.EmailBackend" in result.stderr
    assert "set EMAIL_HOST" in result.stderr


def test_production_sends_mail_over_smtp_when_email_host_is_set():
    show = "from django.conf import settings; print(settings.MAILERS['default']['BACKEND'])"

    result = manage("shell", "--verbosity", "0", "-c", show, env=PRODUCTION)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "django.core.mail.backends.smtp.EmailBackend"


def test_a_benchmark_may_opt_out_of_real_mail_explicitly():
    env = {
        **PRODUCTION,
        "EMAIL_HOST": None,
        "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
        "ALLOW_LOCAL_EMAIL_BACKEND": "true",
    }

    result = manage("check", env=env)

    assert result.returncode == 0, result.stderr


def test_development_keeps_mail_on_the_console():
    show = "from django.conf import settings; print(settings.MAILERS['default']['BACKEND'])"

    result = manage(
        "shell", "--verbosity", "0", "-c", show, env={"DEBUG": None, "EMAIL_HOST": None}
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "django.core.mail.backends.console.EmailBackend"
