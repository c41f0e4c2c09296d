"""Which TCP/UDP sockets a process tree listens on, read from /proc (no psutil, no ``ss`` needed).

Used by ``test_loopback.py`` to check that a local Ray listens on loopback only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from each process's parent PID in ``/proc/<pid>/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _socket_inodes(pids: list[int]) -> dict[str, int]:
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    return inodes


def _address(hex_ip: str, family: int) -> str:
    raw = bytes.fromhex(hex_ip)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[::-1])
    return socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets(pids: list[int]) -> list[dict[str, object]]:
    """Listening TCP and bound UDP sockets of ``pids``: ``{"process", "pid", "proto", "ip", "port"}`` each."""
    inodes = _socket_inodes(pids)
    found = []
    for proto, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6),
                          ("udp", socket.AF_INET), ("udp6", socket.AF_INET6)):  # fmt: skip
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in inodes or (proto.startswith("tcp") and state != "0A"):  # 0A = LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            pid = inodes[inode]
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                name = "?"
            found.append({"process": name, "pid": pid, "proto": proto, "ip": _address(hex_ip, family),
                          "port": int(hex_port, 16)})  # fmt: skip
    return found


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (``::ffff:127.0.0.1``)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback
