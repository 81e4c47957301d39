"""scripts/install_torch.py: the set-up decision (keep, CPU index, override, fallback), probe and runner injected."""

from __future__ import annotations

import http.server
import importlib.util
import socket
import sys
import threading
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_torch.py"
_spec = importlib.util.spec_from_file_location("install_torch", SCRIPT)
it = importlib.util.module_from_spec(_spec)
sys.modules["install_torch"] = it  # dataclasses look the module up by name
_spec.loader.exec_module(it)


class Probe:
    """Records the urls probed and answers with a fixed result."""

    def __init__(self, result: str | None):
        self.result, self.calls = result, []

    def __call__(self, url: str) -> str | None:
        self.calls.append(url)
        return self.result


class Runner:
    """Records pip commands and returns the queued exit codes in turn."""

    def __init__(self, *codes: int):
        self.codes, self.calls = list(codes), []

    def __call__(self, cmd: list[str]) -> int:
        self.calls.append(cmd)
        return self.codes.pop(0)


def index_of(cmd: list[str]) -> str | None:
    assert cmd[1:6] == ["-m", "pip", "install", "-q", f"torch=={it.TORCH_VERSION}"]
    return cmd[cmd.index("--index-url") + 1] if "--index-url" in cmd else None


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0+cpu", "2.13.1+cu126"])
def test_installed_torch_213_is_kept_without_probe_or_pip(version):
    probe, runner, lines = Probe(None), Runner(), []
    plan = it.decide({it.ENV_VAR: "https://example.invalid/x"}, version, probe)
    assert plan.action == "keep" and probe.calls == []
    assert it.run(plan, runner, lines.append) == 0 and runner.calls == []
    assert lines == [f"install_torch: torch {version} is already installed here; keeping it"]


def test_reachable_cpu_index_installs_the_cpu_wheel_from_it():
    probe, runner, lines = Probe(None), Runner(0), []
    plan = it.decide({}, None, probe)
    assert probe.calls == [it.CPU_INDEX] and plan.index_url == it.CPU_INDEX and plan.fallback
    assert it.run(plan, runner, lines.append) == 0
    assert [index_of(c) for c in runner.calls] == [it.CPU_INDEX]
    assert "CPU index is reachable" in lines[0] and lines[-1] == "install_torch: done"


def test_unreachable_cpu_index_falls_back_to_the_configured_index_and_says_why():
    probe, runner, lines = Probe("URLError: timed out"), Runner(0), []
    plan = it.decide({}, None, probe)
    assert plan.action == "install" and plan.index_url is None
    it.run(plan, runner, lines.append)
    assert [index_of(c) for c in runner.calls] == [None]
    assert "unreachable (URLError: timed out)" in lines[0] and "falling back" in lines[0]


def test_failed_install_from_cpu_index_retries_from_the_configured_index():
    runner, lines = Runner(1, 0), []
    assert it.run(it.decide({}, None, Probe(None)), runner, lines.append) == 0
    assert [index_of(c) for c in runner.calls] == [it.CPU_INDEX, None]
    assert any("failed (exit 1); falling back" in line for line in lines)


@pytest.mark.parametrize("value", ["default", "DEFAULT", " default "])
def test_override_default_skips_the_probe(value):
    probe, runner = Probe(None), Runner(0)
    plan = it.decide({it.ENV_VAR: value}, None, probe)
    assert probe.calls == [] and plan.index_url is None and not plan.fallback
    it.run(plan, runner, lambda s: None)
    assert [index_of(c) for c in runner.calls] == [None]


def test_override_url_is_used_without_probe_and_without_fallback():
    url = "https://download.pytorch.org/whl/cu126"
    probe, runner, lines = Probe("unreachable"), Runner(2), []
    plan = it.decide({it.ENV_VAR: url}, None, probe)
    assert probe.calls == [] and plan.index_url == url
    assert it.run(plan, runner, lines.append) == 2
    assert [index_of(c) for c in runner.calls] == [url] and lines[-1] == "install_torch: pip failed (exit 2)"


def test_other_torch_version_is_replaced_and_the_line_says_so():
    plan = it.decide({}, "2.12.1", Probe(None))
    assert plan.action == "install" and "replacing torch 2.12.1" in plan.reason


def test_empty_override_counts_as_unset():
    probe = Probe(None)
    assert it.decide({it.ENV_VAR: ""}, None, probe).index_url == it.CPU_INDEX and probe.calls == [it.CPU_INDEX]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/ok/torch/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_probe_index_against_a_local_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert it.probe_index(base + "/ok/", timeout=5) is None
        assert it.probe_index(base + "/missing", timeout=5) == "HTTP 404"
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert it.probe_index(f"http://127.0.0.1:{port}", timeout=5).startswith("URLError")


def test_bad_timeout_is_rejected(capsys):
    with pytest.raises(SystemExit):
        it.main(["--timeout", "0"])
    assert "--timeout: expected a positive number" in capsys.readouterr().err
