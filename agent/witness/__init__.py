"""The witness: watches the kernel for subject sockets that went around the proxy.

Glossary: probes (bpf/*.c, loaded by loader.py) -> events (events.py) ->
cross-check (crosscheck.py, against the proxy's SessionLookup) -> alerts;
the sweep (sweep.py) catches what events cannot; witness.py runs it all.
"""

from agent.witness.crosscheck import SessionLookup
from agent.witness.loader import WitnessUnavailable
from agent.witness.witness import Witness

__all__ = ["Witness", "SessionLookup", "WitnessUnavailable"]
