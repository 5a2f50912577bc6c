"""bench.cpu_split: `perf script` stacks sorted into the server's own work and loopback's."""

from __future__ import annotations

from bench import cpu_split
from bench.cpu_split import ACKS, CLIENT, OTHER, RECEIVE_COMMON, SEND_PATH, USER

K = "([kernel.kallsyms])"


def sample(*frames: str) -> str:
    """One sample of `perf script` output, innermost frame first."""
    body = "".join(f"\tffffffff81000000 {frame}\n" for frame in frames)
    return f"python 30820 14565.520276:     500250 cpu-clock:pppH: \n{body}\n"


RECEIVE_FROM_WRITE = [
    f"__netif_receive_skb_one_core+0x3c {K}", f"process_backlog+0x8e {K}",
    f"__napi_poll+0x2b {K}", f"net_rx_action+0x1a0 {K}", f"handle_softirqs+0xd0 {K}",
    f"__local_bh_enable_ip+0x60 {K}", f"__dev_queue_xmit+0x300 {K}",
    f"tcp_sendmsg_locked+0x7df {K}", f"tcp_sendmsg+0x2b {K}", f"sock_write_iter+0x100 {K}",
    f"vfs_write+0x267 {K}", f"ksys_write+0xba {K}", f"do_syscall_64+0x71 {K}",
    "__GI___libc_write+0x4f (/usr/lib/x86_64-linux-gnu/libc.so.6)",
]

SCRIPT = "".join([
    sample("_PyEval_EvalFrameDefault+0x3ce6 (/usr/lib/libpython3.11.so.1.0)",
           "7f932f712bc0 [unknown] ([unknown])"),
    sample(f"__alloc_skb+0x10 {K}", f"tcp_sendmsg_locked+0x7df {K}", f"tcp_sendmsg+0x2b {K}",
           f"vfs_write+0x267 {K}", f"ksys_write+0xba {K}", f"do_syscall_64+0x71 {K}"),
    sample(f"_raw_spin_unlock_irqrestore+0x19 {K}", f"ep_poll_callback+0x40 {K}",
           f"sock_def_readable+0x40 {K}", f"tcp_data_queue+0x500 {K}",
           f"tcp_rcv_established+0x200 {K}", f"tcp_v4_rcv+0x900 {K}", *RECEIVE_FROM_WRITE),
    sample(f"tcp_clean_rtx_queue+0x100 {K}", f"tcp_ack+0x300 {K}",
           f"tcp_rcv_established+0x200 {K}", f"tcp_v4_rcv+0x900 {K}", *RECEIVE_FROM_WRITE),
    sample(f"__inet_lookup_established+0x50 {K}", f"tcp_v4_rcv+0x900 {K}",
           *RECEIVE_FROM_WRITE),
    sample(f"tcp_ack+0x300 {K}", f"tcp_v4_do_rcv+0x100 {K}", f"__release_sock+0x80 {K}",
           f"release_sock+0x20 {K}", f"tcp_sendmsg+0x2b {K}", f"vfs_write+0x267 {K}"),
    sample(f"ep_poll+0x100 {K}", f"do_epoll_wait+0x50 {K}", f"do_syscall_64+0x71 {K}"),
])


def test_each_sample_lands_in_the_category_its_stack_says() -> None:
    assert [cpu_split.classify(stack) for stack in cpu_split.stacks(SCRIPT.splitlines())] == [
        USER, SEND_PATH, CLIENT, ACKS, RECEIVE_COMMON, ACKS, OTHER]


def test_a_receive_below_the_servers_write_is_not_counted_as_its_send_path() -> None:
    # The receive softirq runs inside the write system call: the frames outside it say
    # "send", the ones inside it say whose work it is.
    stack = next(cpu_split.stacks(sample(f"tcp_data_queue+0x500 {K}",
                                         *RECEIVE_FROM_WRITE).splitlines()))
    assert cpu_split.classify(stack) == CLIENT


def test_the_split_gives_shares_in_percent_that_add_up() -> None:
    result = cpu_split.split(SCRIPT.splitlines())
    assert result["samples"] == 7
    shares = result["shares"]
    assert list(shares) == list(cpu_split.CATEGORIES)
    assert shares[ACKS] == round(100 * 2 / 7, 1)
    assert abs(sum(shares.values()) - 100) < 0.5


def test_no_samples_is_an_error_not_a_division_by_zero() -> None:
    assert cpu_split.split([]) == {"error": "no samples"}
