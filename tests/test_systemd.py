"""The systemd units shipped in the package: `systemd-analyze verify` passes on both, `fp-outbox
systemd-unit` prints them, and the worker delivers under the MemoryDenyWriteExecute filter they set."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import outbox
from tests.conftest import REPO, status_of, url_string
from worker.admin import units

SHIPPED = REPO / "worker" / "admin" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or ("/usr/bin/systemd-analyze"
                                                      if Path("/usr/bin/systemd-analyze").exists() else None)


def _settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("instance", [False, True], ids=["service", "template"])
def test_systemd_analyze_verify_passes(tmp_path, instance):
    # verify checks that ExecStart's binary exists, and /opt/fp-outbox/venv does not exist here: the copy
    # under test points ExecStart at this environment's fp-outbox-worker (or /bin/true) instead.
    worker = Path(sys.executable).parent / "fp-outbox-worker"
    unit = units.unit_text(instance, exec_start=str(worker) if worker.exists() else "/bin/true")
    path = tmp_path / units.UNIT_NAMES[instance]
    path.write_text(unit)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    # Unknown keys and unparsable values are only warnings (exit 0), so the output must be clean too.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "fp-outbox-worker" in line]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr


@pytest.mark.parametrize("instance", [False, True], ids=["service", "template"])
def test_the_units_say_what_the_issue_asks(instance):
    settings = _settings((SHIPPED / units.UNIT_NAMES[instance]).read_text())
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure", "RestartSec": "2",
        "ExecStart": units.DEFAULT_EXEC_START, "DynamicUser": "yes", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "SystemCallFilter": "@system-service", "TimeoutStopSec": "40",
        "KillSignal": "SIGTERM",
        # Bad configuration, a missing grant, no schema: a restart cannot fix them. A read-only database (a
        # failover) is waited out by the worker itself: it never exits on it.
        "RestartPreventExitStatus": "2 4 5",
    }
    assert {key: settings[key][0] for key in expected} == expected
    assert settings["EnvironmentFile"][0] == "/etc/fp-outbox/worker.env"
    assert settings["EnvironmentFile"][1:] == (["-/etc/fp-outbox/worker-%i.env"] if instance else [])
    assert settings["ExecStart"] == [units.DEFAULT_EXEC_START]  # no token or URL on the command line


def test_the_command_prints_the_shipped_units(capsys):
    from worker.admin import main

    for instance in (False, True):
        assert main(["systemd-unit", *(["--instance"] if instance else [])]) == 0
        assert capsys.readouterr().out == (SHIPPED / units.UNIT_NAMES[instance]).read_text()
    assert main(["systemd-unit", "--exec-start", "/srv/app/.venv/bin/fp-outbox-worker"]) == 0
    out, err = capsys.readouterr()
    assert "ExecStart=/srv/app/.venv/bin/fp-outbox-worker\n" in out and units.DEFAULT_EXEC_START not in out
    assert "does not exist on this machine" in err
    assert main(["systemd-unit", "--exec-start", "venv/bin/fp-outbox-worker"]) == 2
    assert "absolute path" in capsys.readouterr().err


# systemd 252 implements MemoryDenyWriteExecute=yes as this seccomp filter: no mmap that is both
# writable and executable, no mprotect/pkey_mprotect adding PROT_EXEC, no shmat with SHM_EXEC (EPERM).
# The script installs it and then execs the worker, which keeps it (as under systemd).
_UNDER_MDWE = r"""
import ctypes, mmap, os, struct, sys
ARCH = {"x86_64": (0xC000003E, 9, 10, 329, 30), "aarch64": (0xC00000B7, 222, 226, 288, 196)}
arch, nr_mmap, nr_mprotect, nr_pkey_mprotect, nr_shmat = ARCH[os.uname().machine]
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
def op(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)
program = [
    op(LD, 4), op(JEQ, arch, 1, 0), op(RET, ALLOW), op(LD, 0),
    op(JEQ, nr_mmap, 4, 0), op(JEQ, nr_mprotect, 6, 0), op(JEQ, nr_pkey_mprotect, 5, 0), op(JEQ, nr_shmat, 8, 0),
    op(RET, ALLOW),
    op(LD, 32), op(AND, 6), op(JEQ, 6, 8, 7),                # mmap: PROT_WRITE|PROT_EXEC
    op(LD, 32), op(AND, 4), op(JEQ, 4, 5, 4), op(RET, ALLOW),  # mprotect: PROT_EXEC
    op(LD, 32), op(AND, 0o100000), op(JEQ, 0o100000, 1, 0),  # shmat: SHM_EXEC
    op(RET, ALLOW), op(RET, EPERM),
]
code = b"".join(program)
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(Program(len(program), code)), 0, 0):
    sys.exit(f"seccomp: errno {ctypes.get_errno()}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("the filter is not in force: a writable and executable mapping was allowed")
except PermissionError:
    pass
os.execv(sys.executable, [sys.executable, "-m", "worker", *sys.argv[1:]])
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"),
                    reason="the seccomp filter is written for Linux on x86_64 and aarch64")
def test_the_worker_delivers_under_memory_deny_write_execute(clean, db_url, sink, tmp_path):
    with clean.begin() as conn:
        for i in range(5):
            outbox.enqueue(conn, {"event": "E", "properties": {"distinct_id": str(i), "token": "t"}})
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-c", _UNDER_MDWE, "--database-url", url_string(db_url),
                               "--endpoint", sink.url, "--drain"], stdout=out, stderr=subprocess.STDOUT,
                              cwd=REPO, timeout=60)
    assert proc.returncode == 0, log.read_text()
    assert status_of(clean) == {"delivered": 5}
