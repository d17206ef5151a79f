"""Run a command under a systemd unit's process restrictions, without systemd as PID 1.

    python tests/unit_sandbox.py systemd/customs-edge@.service -- customs-edge run --config unit.yaml

Reads the unit file and applies, in this process, then execs the command:
- `SystemCallFilter=` (allow list and `~` deny lists, groups expanded by `systemd-analyze syscall-filter`,
  so the sets are this machine's systemd's own) with `SystemCallErrorNumber=`, native architecture only;
- `MemoryDenyWriteExecute=yes` as systemd 252 (Debian 12) builds it with seccomp: no mmap that is both
  writable and executable, no mprotect/pkey_mprotect adding PROT_EXEC, no shmat with SHM_EXEC; and also the
  kernel's own PR_SET_MDWE (Linux >= 6.3, what systemd >= 253 uses) where the kernel has it;
- `RestrictAddressFamilies=` (socket() of any other family fails with EAFNOSUPPORT);
- `CapabilityBoundingSet=` (emptied: no capability survives the exec, even as root), `NoNewPrivileges=`,
  `UMask=`.
What it does not reproduce (mount namespaces, DevicePolicy, users, IP address lists, MemoryMax) is what
`systemd-run -p ...` on a machine with systemd as PID 1 checks (docs/hardening.md).

libseccomp is called through ctypes (libseccomp.so.2, which Debian's apt and systemd depend on).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_MASKED_EQ = 4, 5, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 24, 65, 1
AF_UNSPEC, AF_MAX = 0, 64
FAMILIES = {"AF_UNIX": 1, "AF_LOCAL": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}


def scmp_act_errno(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of the [Service] section, in order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: every @group and its members (names and nested @groups)."""
    text = subprocess.run([shutil.which("systemd-analyze") or "systemd-analyze", "syscall-filter", "--no-pager"],
                          capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for n in names:
        if n.startswith("@"):
            out |= expand(groups[n], groups)
        else:
            out.add(n)
    return out


def allowed_syscalls(filters: list[str], groups: dict[str, list[str]]) -> set[str] | None:
    """systemd's reading of the SystemCallFilter= lines: the first one decides allow list (no `~`) or deny
    list; later allow lines add, `~` lines remove. None: no allow list (only a deny list, not used here)."""
    allow: set[str] | None = None
    for f in filters:
        deny = f.startswith("~")
        names = expand(f.lstrip("~").split(), groups)
        if allow is None:
            if deny:
                return None
            allow = names
        elif deny:
            allow -= names
        else:
            allow |= names
    return allow


class Seccomp:
    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                    ctypes.POINTER(ArgCmp)]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def nr(self, name: str) -> int:
        return int(self.lib.seccomp_syscall_resolve_name(name.encode()))

    def load(self, default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]) -> None:
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        try:
            for action, name, cmps in rules:
                nr = self.nr(name)
                if nr < 0:  # not a system call on this architecture
                    continue
                arr = (ArgCmp * max(1, len(cmps)))(*[ArgCmp(*c) for c in cmps])
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
                if rc < 0:
                    raise OSError(-rc, f"seccomp_rule_add {name}: {os.strerror(-rc)}")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)


def apply(unit: Path) -> list[str]:
    """Apply the unit's restrictions to this process; returns what was applied, one line each."""
    s = unit_settings(unit)
    done: list[str] = []
    # read before any filter is loaded (it runs systemd-analyze)
    allow = allowed_syscalls(s["SystemCallFilter"], syscall_groups()) if "SystemCallFilter" in s else None
    libc = ctypes.CDLL(None, use_errno=True)
    if "UMask" in s:
        os.umask(int(s["UMask"][-1], 8))
        done.append(f"UMask={s['UMask'][-1]}")
    if s.get("CapabilityBoundingSet") == [""]:
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM as non-root (nothing to drop), EINVAL past the last
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        libc.capset(header, data)
        done.append("CapabilityBoundingSet= (all dropped)")
    if s.get("NoNewPrivileges", ["no"])[-1] == "yes" or "SystemCallFilter" in s:
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        done.append("NoNewPrivileges=yes")
    sc = Seccomp()
    if s.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        eperm = scmp_act_errno(errno.EPERM)
        wx = PROT_WRITE | PROT_EXEC
        sc.load(SCMP_ACT_ALLOW, [
            (eperm, "mmap", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (eperm, "mmap2", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (eperm, "mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (eperm, "pkey_mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (eperm, "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
        ])
        mdwe = libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0
        done.append("MemoryDenyWriteExecute=yes (seccomp" + (" and PR_SET_MDWE)" if mdwe else "; no PR_SET_MDWE)"))
    if "RestrictAddressFamilies" in s:
        fams = {FAMILIES[f] for f in s["RestrictAddressFamilies"][-1].split()}
        eaf = scmp_act_errno(errno.EAFNOSUPPORT)
        rules = [(eaf, "socket", [(0, SCMP_CMP_EQ, f, 0)]) for f in range(AF_UNSPEC, AF_MAX) if f not in fams]
        rules.append((eaf, "socket", [(0, SCMP_CMP_GE, AF_MAX, 0)]))
        sc.load(SCMP_ACT_ALLOW, rules)
        done.append(f"RestrictAddressFamilies={s['RestrictAddressFamilies'][-1]}")
    # last, as systemd does: the allow list may not include seccomp() itself
    if "SystemCallFilter" in s:
        if allow is None:
            raise SystemExit(f"{unit}: only allow-list SystemCallFilter= is reproduced here")
        err = s.get("SystemCallErrorNumber", ["EPERM"])[-1]
        default = scmp_act_errno(getattr(errno, err)) if err != "kill" else 0x80000000
        sc.load(default, [(SCMP_ACT_ALLOW, n, []) for n in sorted(allow)])
        done.append(f"SystemCallFilter: {len(allow)} system calls allowed, the rest {err}")
    return done


def unit_command(unit: Path, key: str = "ExecStart") -> list[str]:
    """The unit's command line for `key` (no specifiers resolved)."""
    return unit_settings(unit)[key][-1].split()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(__doc__)
    unit, cmd = Path(argv[0]), argv[2:]
    for line in apply(unit):
        print(f"unit_sandbox: {line}", file=sys.stderr)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])

