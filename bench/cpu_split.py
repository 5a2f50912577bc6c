"""Where a server's CPU time goes, from `perf` call stacks: user space (the interpreter and the
libraries), the kernel's send path, and the receiving side's TCP path.

    perf record -g -p PID -o gw.perf -- sleep 5
    perf script -i gw.perf | python -m bench.cpu_split

On loopback the kernel runs the receiving side of a write inside the writer's system call:
the client's TCP input, its socket's wakeup and the ACK it sends back all count as the
server's CPU, where a client on another machine would pay them itself. This splits the
server's samples so that the share of its CPU per delivered frame that is its own work can be
told from the share that only loopback puts on it. `make bench BENCH_ARGS=--profile` runs it
on the gateway during the largest fan-out (when `perf` is installed and allowed).

A sample is put in the first category whose rule matches, by the kernel functions on its
stack (`RECEIVE`, `CLIENT_SIDE`, `SERVER_ACKS`, `SEND`); a sample whose innermost frame is
not in the kernel is user space.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .procs import run_bounded

KERNEL_DSO = "[kernel.kallsyms]"

RECEIVE = frozenset({"net_rx_action", "__napi_poll", "process_backlog",
                     "__netif_receive_skb", "__netif_receive_skb_one_core"})
"""The receive softirq: on loopback, entered from the writer's own `write`."""
CLIENT_SIDE = frozenset({
    "tcp_data_queue", "tcp_queue_rcv", "tcp_event_data_recv", "tcp_data_ready",
    "sock_def_readable", "ep_poll_callback", "__wake_up_common", "tcp_rcv_space_adjust",
    "tcp_measure_rcv_mss", "__tcp_ack_snd_check", "tcp_send_ack", "__tcp_send_ack",
    "tcp_send_delayed_ack",
})
"""Below the receive softirq: a data segment arriving at the client's socket, the client's
wakeup, and the ACK the client sends back."""
SERVER_ACKS = frozenset({"tcp_ack", "tcp_clean_rtx_queue", "tcp_ack_update_rtt",
                         "tcp_rearm_rto"})
"""Below the receive softirq (or the socket backlog): an ACK arriving at a server socket."""
SEND = frozenset({"ksys_write", "vfs_write", "sock_write_iter", "tcp_sendmsg",
                  "tcp_sendmsg_locked", "__sys_sendto", "__sys_sendmsg", "sock_sendmsg"})
"""The server's own send path: the write system call down to the device."""

CATEGORIES = (
    "user space (interpreter, libraries)",
    "kernel: send path",
    "kernel, loopback receive: the client's side (its TCP input, wakeup, ACK)",
    "kernel, loopback receive: ACKs arriving at the server's sockets",
    "kernel, loopback receive: IP input, socket lookup, freeing buffers",
    "kernel: other (epoll, reads, timers, interrupts)",
)
USER, SEND_PATH, CLIENT, ACKS, RECEIVE_COMMON, OTHER = CATEGORIES


def stacks(script: Iterable[str]) -> Iterator[list[tuple[str, str]]]:
    """The call stacks of `perf script` output, innermost frame first, as (function, dso)."""
    stack: list[tuple[str, str]] = []
    in_sample = False
    for line in script:
        if not line.strip():
            if stack:
                yield stack
            stack, in_sample = [], False
        elif line[0] in " \t":
            if in_sample:
                parts = line.split(None, 1)
                if len(parts) == 2:
                    symbol, _, dso = parts[1].rstrip().rpartition(" (")
                    stack.append((symbol.partition("+0x")[0], dso.rstrip(")")))
        else:  # a sample's header: comm pid time: period event:
            if stack:
                yield stack
            stack, in_sample = [], True
    if stack:
        yield stack


def classify(stack: list[tuple[str, str]]) -> str:
    """The category of one sample (innermost frame first)."""
    if not stack or stack[0][1] != KERNEL_DSO:
        return USER
    functions = [function for function, _ in stack]
    seen = set(functions)
    if seen & RECEIVE:
        outermost = max(i for i, function in enumerate(functions) if function in RECEIVE)
        inner = set(functions[:outermost])
        if inner & CLIENT_SIDE:
            return CLIENT
        if inner & SERVER_ACKS:
            return ACKS
        return RECEIVE_COMMON
    if seen & SERVER_ACKS and "__release_sock" in seen:
        return ACKS  # processed from the socket's backlog when the server's write let go of it
    if seen & SEND:
        return SEND_PATH
    return OTHER


def split(script: Iterable[str]) -> dict[str, Any]:
    """Shares (%) of the samples per category, in `CATEGORIES` order, and the sample count."""
    counts = Counter(classify(stack) for stack in stacks(script))
    total = sum(counts.values())
    if not total:
        return {"error": "no samples"}
    return {"samples": total,
            "shares": {category: round(100 * counts[category] / total, 1)
                       for category in CATEGORIES}}


async def record(pid: int, seconds: float, out: Path) -> dict[str, Any]:
    """`perf record -g` the process `pid` for `seconds` into `out`, then `split` it."""
    perf = shutil.which("perf")
    if perf is None:
        return {"error": "perf not installed"}
    try:
        code, _, err = await run_bounded(
            perf, "record", "-g", "-F", "999", "-o", str(out), "-p", str(pid),
            "--", "sleep", str(seconds), timeout=seconds + 30)
    except TimeoutError:
        return {"error": "perf record did not finish"}
    if code != 0:
        return {"error": f"perf record failed: {err.decode(errors='replace').strip()[-300:]}"}
    try:
        _, text, _ = await run_bounded(perf, "script", "-i", str(out), timeout=120)
    except TimeoutError:
        return {"error": "perf script did not finish"}
    return {"file": str(out), **split(text.decode(errors="replace").splitlines())}


def main() -> None:
    result = split(sys.stdin)
    if "error" in result:
        print(result["error"])
        raise SystemExit(1)
    print(f"{result['samples']} samples")
    for category, share in result["shares"].items():
        print(f"{share:5.1f} %  {category}")


if __name__ == "__main__":
    main()
