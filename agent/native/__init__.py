"""The native data plane, compiled from the C beside this file (setup.py).

Chain: the store's append point (frame, SHA-256 chain, crc, writev) and the
store writer's lock. Pump: relay threads that read a session's sockets,
append each chunk to the chain and send it on, without the GIL.
"""

from agent.native._native import Chain, Pump

__all__ = ["Chain", "Pump"]
