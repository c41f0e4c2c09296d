"""Scratch probe: which threads on the machine wake up most often (context switches/s) over a window.

Usage: .venv/bin/python benchmarks/probe_ray_slowdown/wakeups.py [SECONDS]
"""
import os
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")


def snap() -> dict:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:110]
            for tid in os.listdir(f"/proc/{pid}/task"):
                st = open(f"/proc/{pid}/task/{tid}/status").read().splitlines()
                d = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in st}
                s = open(f"/proc/{pid}/task/{tid}/stat").read()
                rest = s[s.rfind(")") + 2:].split()
                out[(int(pid), int(tid))] = (cmd, d["Name"], int(d["voluntary_ctxt_switches"]),
                                              int(d["nonvoluntary_ctxt_switches"]),
                                              (int(rest[11]) + int(rest[12])) / CLK)
        except (OSError, KeyError):
            continue
    return out


secs = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
a = snap()
time.sleep(secs)
b = snap()
rows = []
for k, (cmd, name, v, nv, cpu) in b.items():
    if k in a:
        rows.append(((v - a[k][2]) / secs, (nv - a[k][3]) / secs, (cpu - a[k][4]) / secs, k, name, cmd))
rows.sort(reverse=True)
print(f"{'vol/s':>7} {'invol/s':>7} {'cpu':>5}  pid/tid  thread  process")
for r in rows[:25]:
    print(f"{r[0]:7.0f} {r[1]:7.0f} {r[2]:5.2f}  {r[3][0]}/{r[3][1]}  {r[4]:<16} {r[5]}")
print(f"total vol/s {sum(r[0] for r in rows):.0f}")
procs: dict = {}
for r in rows:
    p = procs.setdefault(r[3][0], [0.0, 0.0, r[5]])
    p[0] += r[2]
    p[1] += r[0]
print("\nper process: cpu share, wakeups/s")
for pid, (cpu, vol, cmd) in sorted(procs.items(), key=lambda kv: -kv[1][0])[:22]:
    print(f"{cpu:6.3f} {vol:6.0f}  {pid}  {cmd}")
print(f"total cpu of all but the top process: {sum(v[0] for v in procs.values()) - max(v[0] for v in procs.values()):.3f}")
