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


def test_bad_limits_and_ports_are_refused_before_the_model_loads():
    import socket

    for args, says in (
        (["--port", "70000"], "--port must be from 1 to 65535"),  # uvicorn took 70000 and printed it as the URL
        (["--port", "-1"], "--port must be from 1 to 65535"),
        (["--max-session-seconds", "-5"], "must be more than 0"),  # every session would end at once
        (["--max-upload-mb", "0"], "must be more than 0"),  # every portrait would be refused
        (["--host", "nosuchhost.invalid", "--token", "t"], "not an address of this machine"),
    ):
        result = CliRunner().invoke(app(), ["serve", "--model", "no-such-model", *args])
        assert result.exit_code != 0 and says in str(result.exception), (args, result.exception)
    with socket.socket() as taken:  # a port in use: said now, not after minutes of loading and warming up
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app(), ["serve", "--model", "no-such-model", "--port", str(port)])
        assert f"cannot serve on 127.0.0.1:{port}: address already in use" in str(result.exception)


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.2") and not is_loopback("example.com")


def test_speed_switches_are_refused_with_ray():
    result = CliRunner().invoke(app(), ["serve", "--ray", "local", "--optimized"])
    assert result.exit_code != 0 and "not available with --ray" in str(result.exception)


def test_switches_warm_every_batch_size_before_serving(tmp_path):
    """`--switches` turns speed switches on; the server then runs each batch size once before it listens."""
    import os
    import subprocess
    import sys

    from _util import REPO

    from ._serving import free_port, wait_for_health

    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "flashhead.cli", "serve", "--model", "tiny", "--port", str(port), "--max-batch", "2",
         "--switches", "rope_table,cond_cache"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        wait_for_health(process, f"http://127.0.0.1:{port}", timeout=120)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    lines = output.splitlines()
    warmed = [i for i, line in enumerate(lines) if "warmed up batch sizes 1-2" in line]
    listening = [i for i, line in enumerate(lines) if "on http://127.0.0.1" in line]
    assert warmed and listening and warmed[0] < listening[0], output  # warm before serving
    assert "compile cache: off" in lines[warmed[0]]  # no compile switch: nothing to cache
    assert "in thread flashhead-engine" in lines[warmed[0]]  # where the sessions will run (cuDNN's choices)


def test_the_warm_up_runs_in_the_engine_thread_that_will_serve(tmp_path):
    """cuDNN's algorithm choices are kept per thread: warming up in another thread than the sessions' would leave
    the first session to search them again. The served app's worker is the one warmed, and keeps running."""
    import threading

    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
    from flashhead.serve.app import create_app
    from flashhead.serve.cli import warm_in_engine_thread

    pipe = FlashHeadPipeline.from_pretrained("tiny")
    app = create_app(pipe)
    worker = app.state.service.worker
    try:
        result = warm_in_engine_thread(worker, pipe, max_batch=1, compile_cache="off")
        assert result["thread"] == "flashhead-engine" != threading.current_thread().name
        assert sorted(result["seconds_by_batch"]) == [1] and worker.running
        thread = worker._thread
        worker.start()  # what the server's start does: the same thread goes on serving
        assert worker._thread is thread
    finally:
        worker.stop()
