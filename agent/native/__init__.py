"""The native data plane, compiled from the C beside this file (setup.py).

Chain: the store's append point (frame, SHA-256 chain, crc, the write into the segment) and the
store writer's lock; its append_many takes APPEND_MANY_MAX records at most.
Pump: relay threads that read a session's sockets, append each chunk to the
chain and send it on, without the GIL.
Opener: the relay threads accept (accept.c) and open in C the sessions whose
every judgement Python has already made (opening.c), leaving the rest to
Python; KERNEL_PROBE is the evidence's "probe" it writes.
original_dst: a redirected connection's destination before the redirect
(accept.c), for the asyncio relay.
"""

from agent.native._native import APPEND_MANY_MAX, KERNEL_PROBE, Chain, Opener, Pump, original_dst

__all__ = ["APPEND_MANY_MAX", "KERNEL_PROBE", "Chain", "Opener", "Pump", "original_dst"]
