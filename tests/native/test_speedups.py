"""One place decides which path runs (zrouter/_speedups.py): compiled when built, pure Python
when ``ZROUTER_PURE=1`` or when the compiled modules cannot be imported."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from zrouter import _speedups, protocol

PURE = os.environ.get(_speedups.PURE_ENV, "") not in ("", "0")


def _implementation(env: dict[str, str], prelude: str = "") -> tuple[str, str]:
    code = f"{prelude}\nfrom zrouter import _speedups as s\nprint(s.implementation()); print(s.why_pure())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    impl, why = [*out.stdout.splitlines(), "", ""][:2]
    return impl, why


def test_this_run_uses_the_path_the_environment_asks_for() -> None:
    # `make test` runs the suite twice: compiled (the install builds it; a failed build fails
    # here rather than quietly testing the pure path twice), then with ZROUTER_PURE=1.
    assert _speedups.implementation() == ("pure" if PURE else "native"), _speedups.why_pure()
    assert _speedups.native() is (not PURE)
    if PURE:
        assert _speedups.decode_request is protocol.decode_request
    else:
        assert _speedups.decode_request is _speedups.load_native("codec").decode_request
        assert _speedups.why_pure() == ""


def test_zrouter_pure_forces_the_pure_path() -> None:
    impl, why = _implementation({_speedups.PURE_ENV: "1"})
    assert impl == "pure" and "ZROUTER_PURE=1" in why


def test_zrouter_pure_0_or_empty_means_compiled() -> None:
    assert _implementation({_speedups.PURE_ENV: "0"})[0] == "native"
    assert _implementation({_speedups.PURE_ENV: ""})[0] == "native"


def test_a_compiled_module_that_does_not_import_falls_back_to_pure() -> None:
    # None in sys.modules makes the import raise ImportError, as a missing or broken build does.
    env = {k: v for k, v in os.environ.items() if k != _speedups.PURE_ENV}
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['zrouter._native.codec'] = None\n"
         "from zrouter import _speedups as s, protocol as p\n"
         "assert s.decode_request is p.decode_request and s.encode_reply is p.encode_reply\n"
         "print(s.implementation()); print(s.why_pure())"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    impl, why = out.stdout.splitlines()[:2]
    assert impl == "pure" and "zrouter._native.codec did not import" in why


def test_load_native_knows_only_the_compiled_modules() -> None:
    try:
        _speedups.load_native("protocol")
    except ImportError as exc:
        assert "no compiled module" in str(exc)
    else:
        raise AssertionError("load_native imported something that is not a compiled module")


def test_the_broker_says_which_path_it_runs(caplog: pytest.LogCaptureFixture) -> None:
    from zrouter.broker.server import Broker, BrokerConfig

    broker = Broker(BrokerConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*"))
    try:
        with caplog.at_level(logging.INFO, logger="zrouter.broker"):
            broker.bind()
    finally:
        broker.close()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("broker listening")]
    assert line.endswith("; pure-Python path" if PURE else "; compiled path")
    # ZROUTER_PURE was asked for: no warning about a missing build.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_unasked_fallback_is_a_warning_at_start_up() -> None:
    code = (
        "import logging, sys\n"
        "sys.modules['zrouter._native.client'] = None\n"  # as a missing build: ImportError
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(levelname)s %(message)s')\n"
        "from zrouter.broker.server import Broker, BrokerConfig\n"
        "b = Broker(BrokerConfig(frontend='tcp://127.0.0.1:*', backend='tcp://127.0.0.1:*'))\n"
        "b.bind(); b.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != _speedups.PURE_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert "; pure-Python path" in out
    assert "WARNING running the pure-Python path (zrouter._native.client did not import" in out
