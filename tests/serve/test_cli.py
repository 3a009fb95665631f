"""`reslab serve` at the command line: one-line errors before serving, a clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from reslab.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_missing_checkpoint_and_busy_port_are_one_line_errors(tiny_run, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err == f"reslab: error: checkpoint {tmp_path / 'missing.pt'} does not exist\n"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"reslab: error: port {port} on 127.0.0.1 is already in use; stop what holds it "
        "or give --port\n"
    )
    assert main(["serve", str(tiny_run), "--max-wait-ms", "-1"]) == 2
    assert "--max-wait-ms must be >= 0" in capsys.readouterr().err
    assert main(["serve", str(tiny_run), "--port", "70000"]) == 2
    assert "--port must be 0 to 65535, got 70000" in capsys.readouterr().err
    assert main(["serve", str(tiny_run), "--threads", "-1"]) == 2
    assert "--threads must be a whole number >= 0, got -1" in capsys.readouterr().err


def start_server(run: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m reslab serve RUN --port 0`, and its address once it answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "reslab", "serve", str(run), "--port", "0", *flags]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    line = server.stdout.readline()
    assert "http://" in line, server.stderr.read()
    return server, line.split(" at ")[1].split()[0]


def test_ctrl_c_stops_the_server_cleanly(tiny_run):
    server, url = start_server(tiny_run, "--precision", "fp32")
    try:
        with urllib.request.urlopen(url + "health", timeout=30) as response:
            assert json.loads(response.read())["status"] == "ok"
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 0, err
    assert out.strip() == "stopped" and "Traceback" not in err
