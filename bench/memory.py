"""PSS and RSS of a process and of a process tree (a server and every descendant), from /proc via psutil.

PSS splits each shared page among the processes that map it, so a tree's PSS sum counts shared libraries and mapped
weights once; the RSS sum counts them once per process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

MIB = 2**20


@dataclass
class Proc:
    pid: int
    name: str
    pss: int
    rss: int
    processes: int = 1  # how many processes the figures add up


def proc_memory(proc: psutil.Process) -> Proc | None:
    try:
        full = proc.memory_full_info()
        return Proc(proc.pid, proc.name(), int(full.pss), int(full.rss))
    except psutil.Error:  # gone, or a zombie
        return None


def subtree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def tree_memory(root: psutil.Process) -> Proc:
    """PSS and RSS summed over root and its descendants (a process that exits meanwhile is left out)."""
    found = [m for m in map(proc_memory, subtree(root)) if m is not None]
    name = found[0].name if found and found[0].pid == root.pid else "?"
    return Proc(root.pid, name, sum(m.pss for m in found), sum(m.rss for m in found), len(found))


def settled_tree(root: psutil.Process, settle_s: float) -> Proc:
    """The tree's memory once two PSS readings a second apart agree within 1 %, or the last reading at the deadline."""
    deadline = time.monotonic() + settle_s
    last = tree_memory(root)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = tree_memory(root)
        if abs(now.pss - last.pss) <= 0.01 * max(last.pss, 1):
            return now
        last = now
    return last
