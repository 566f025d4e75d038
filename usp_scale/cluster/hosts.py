"""SLURM node-list expansion (no torch import, so SLURM scripts start fast)."""
from __future__ import annotations

import re


def expand_slurm_nodelist(nodelist: str) -> list:
    """Expand a SLURM node list such as ``gpu[01-03,07],cpu5`` into host names."""
    hosts = []
    parts, depth, cur = [], 0, ""
    for ch in nodelist:  # split on commas outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                a, b = r.split("-")
                for k in range(int(a), int(b) + 1):
                    hosts.append(f"{prefix}{k:0{len(a)}d}{suffix}")
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts
