"""`serve_command` as the lead wires it into `flashhead` (a typer command)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from flashhead.serve.cli import is_loopback, serve_command


def app() -> typer.Typer:
    cli = typer.Typer()
    cli.command("serve")(serve_command)
    cli.command("other")(lambda: None)  # two commands, so that `serve` is a subcommand as in flashhead
    return cli


def test_help_lists_the_options():
    result = CliRunner().invoke(app(), ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--model", "--port", "--host", "--token", "--weights", "--max-sessions", "--ray"):
        assert option in result.output


def test_bad_ray_options_are_refused_with_a_clear_message():
    # Refused before Ray or a model is started (tests/serve/test_ray.py runs a real cluster).
    result = CliRunner().invoke(app(), ["serve", "--ray", "head-node"])
    assert result.exit_code != 0 and "expected 'local', 'auto', 'ray://HOST:PORT'" in str(result.exception)
    result = CliRunner().invoke(app(), ["serve", "--replicas", "2"])
    assert result.exit_code != 0 and "--replicas needs --ray" in str(result.exception)


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.2") and not is_loopback("example.com")
