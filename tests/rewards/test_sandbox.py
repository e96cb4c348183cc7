"""Code sandbox, used for real: pass/fail, timeout, no network, memory limit, temp dir removed."""

import os
import socket
import time

import pytest

from r1moe.data import PromptSample
from r1moe.rewards import SandboxLimits, accuracy_reward, rule, run_python
from r1moe.rewards.sandbox import network_isolation_prefix

FAST = SandboxLimits(timeout_s=2.0, cpu_s=2, memory_mb=256)


@pytest.mark.parametrize("source,ok", [
    ("assert sum([1, 2, 3]) == 6", True),
    ("from __future__ import annotations\ndef f(x: int) -> int: return x\nassert f(1) == 1", True),
    ("assert 1 + 1 == 3", False),
    ("raise SystemExit(3)", False),
    ("import sys; sys.exit(0)", True),
    ("this is not python", False),
])
def test_pass_and_fail(source, ok):
    assert run_python(source, FAST).ok is ok


def test_infinite_loop_is_killed_within_the_timeout():
    start = time.monotonic()
    result = run_python("while True:\n    pass", FAST)
    assert not result.ok and (result.timed_out or result.returncode == -9)
    assert time.monotonic() - start < FAST.timeout_s + 2.0


def test_sleeping_child_processes_are_killed():
    source = "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    start = time.monotonic()
    assert run_python(source, FAST).ok
    assert time.monotonic() - start < 5.0


@pytest.fixture
def listening_port():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    yield server.getsockname()[1]
    server.close()


def _connect_source(port):
    return f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"


def test_network_attempt_fails(listening_port):
    # The port is open on this host's loopback: only the sandbox can make the connection fail.
    result = run_python(_connect_source(listening_port), FAST)
    assert not result.ok and "connected" not in result.stdout
    assert "OSError" in result.stderr or "Error" in result.stderr


def test_network_namespace_alone_blocks_localhost(listening_port):
    if not network_isolation_prefix():
        pytest.skip("no working `unshare -rn`/`unshare -n` here: only the socket guard applies")
    result = run_python(_connect_source(listening_port), FAST, block_sockets=False)
    assert result.network_isolated and not result.ok and "connected" not in result.stdout


@pytest.mark.parametrize("bomb", [
    "x = bytearray(8 * 1024 ** 3)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 ** 2))",
])
def test_memory_bomb_fails(bomb):
    result = run_python(bomb, FAST)
    assert not result.ok
    assert "MemoryError" in result.stderr or result.returncode < 0


def test_temp_dir_is_removed_and_environment_is_minimal():
    result = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.environ))\nopen('f.txt', 'w').write('x')",
                        FAST)
    assert result.ok, result.stderr
    workdir, env = result.stdout.splitlines()[:2]
    assert "r1moe-sandbox-" in workdir and not os.path.exists(workdir)
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env


CODE = PromptSample(prompt="Write add(a, b).", answer="", kind="code",
                    tests="assert add(2, 3) == 5\nassert add(-1, 1) == 0")


@pytest.mark.parametrize("completion,expected", [
    ("<think>easy</think><answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>", 1.0),
    ("<think>easy</think><answer>\n```python\ndef add(a, b):\n    return a - b\n```\n</answer>", 0.0),
    ("```python\ndef add(a, b):\n    return 0\n```\nfixed:\n```python\ndef add(a, b):\n    return a + b\n```", 1.0),
    ("<answer>def add(a, b): return a + b</answer>", 1.0),  # answer without a fence
    ("<answer>```python\ndef add(a, b):\n    while True: pass\n```</answer>", 0.0),
    ("no code here", 0.0),
])
def test_code_accuracy(monkeypatch, completion, expected):
    monkeypatch.setattr(rule, "CODE_LIMITS", FAST)
    assert accuracy_reward(completion, CODE) == expected


def test_code_sample_without_tests_is_an_error():
    with pytest.raises(ValueError, match="no tests"):
        accuracy_reward("<answer>pass</answer>", PromptSample(prompt="p", answer="", kind="code"))
