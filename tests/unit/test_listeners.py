"""The listener check the shared run samples (tests/common `tcp_listeners`, `non_loopback_listeners`): it
must see a real listening socket, and tell loopback from every other address in both socket tables."""

import os
import socket

import psutil

from common import non_loopback_listeners, off_loopback, sockets_of_this_tree, tcp_listeners

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _line(local: str, state: str, inode: int) -> str:
    return f"   0: {local} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1\n"


def test_a_real_loopback_listener_is_read_with_its_address_and_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port, inode = s.getsockname()[1], os.fstat(s.fileno()).st_ino
        assert (inode, "127.0.0.1", port) in tcp_listeners()
        assert not any(f":{port}" in b for b in non_loopback_listeners())
        # and a socket is traced to the process that holds it (the step a non-loopback listener goes through)
        assert sockets_of_this_tree({inode: f"127.0.0.1:{port}"}) == [
            f"{psutil.Process().name()}[{os.getpid()}] 127.0.0.1:{port}"
        ]


def test_wildcard_and_interface_addresses_are_told_from_loopback():
    tcp = HEADER + "".join(
        [
            _line("0100007F:1F90", "0A", 1),  # 127.0.0.1:8080
            _line("00000000:1F91", "0A", 2),  # 0.0.0.0:8081
            _line("0F02000A:1F92", "0A", 3),  # 10.0.2.15:8082
            _line("00000000:1F93", "01", 4),  # 0.0.0.0:8083, established: not a listener
        ]
    )
    tcp6 = HEADER + "".join(
        [
            _line("00000000000000000000000001000000:1F94", "0A", 5),  # [::1]:8084
            _line("00000000000000000000000000000000:1F95", "0A", 6),  # [::]:8085
            _line("0000000000000000FFFF00000100007F:1F96", "0A", 7),  # [::ffff:127.0.0.1]:8086
        ]
    )
    got = {ino: (a, p) for ino, a, p in tcp_listeners({"tcp": tcp, "tcp6": tcp6})}
    assert got == {
        1: ("127.0.0.1", 8080),
        2: ("0.0.0.0", 8081),
        3: ("10.0.2.15", 8082),
        5: ("::1", 8084),
        6: ("::", 8085),
        7: ("127.0.0.1", 8086),
    }
    off = off_loopback(tcp_listeners({"tcp": tcp, "tcp6": tcp6}))
    assert sorted(off) == [2, 3, 6]
