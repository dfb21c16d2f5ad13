"""The nftables ruleset that forces subjects' egress into the proxy: render it,
apply it in one transaction, read it back, and remove it on explicit order.
"""

from agent.enforce.ruleset import Ruleset, render
from agent.enforce.nft import Nft, NftError

__all__ = ["Ruleset", "render", "Nft", "NftError"]
