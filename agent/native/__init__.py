"""The native data plane, compiled from the C beside this file (setup.py).

Chain: the store's append point (frame, SHA-256 chain, crc, the write into the segment) and the
store writer's lock; its append_many takes APPEND_MANY_MAX records at most.
Pump: relay threads that read a session's sockets, append each chunk to the
chain and send it on, without the GIL.
accept_redirected, original_dst: accepting redirected connections with
their destination before the redirect (accept.c).
Opener: accepting too, and opening in C the sessions whose every judgement
Python has already made (opening.c); KERNEL_PROBE is the evidence's "probe"
it writes.
"""

from agent.native._native import (
    APPEND_MANY_MAX, KERNEL_PROBE, Chain, Opener, Pump, accept_redirected, original_dst,
)

__all__ = ["APPEND_MANY_MAX", "KERNEL_PROBE", "Chain", "Opener", "Pump", "accept_redirected",
           "original_dst"]
