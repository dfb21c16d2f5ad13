"""tollgate: forces a subject's network egress through a recording proxy.

Glossary: *subject* (the Unix user whose egress is forced), *enforce* (the
nftables ruleset), *proxy* (the recording relay), *store* (append-only,
hash-chained evidence), *witness* (eBPF's independent view), *ship* (the copy
in Cloud Logging), *review* (what compliance reads).
"""

__version__ = "0.1.0"
