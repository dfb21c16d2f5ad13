"""The monitored resource entries are filed under (gce_instance).

Instance id and zone come from config or, when empty, from the metadata
server. Only the agent (root) asks it: the proxy denies the subject that
address, because the same server hands out the VM's service-account token.
"""

from __future__ import annotations

import logging
import urllib.request

from agent.config import ShipConfig

log = logging.getLogger("tollgate.ship")

METADATA = "http://169.254.169.254/computeMetadata/v1/instance/"


def gce_resource(cfg: ShipConfig, timeout_s: float = 2.0) -> tuple[str, dict[str, str]]:
    """(resource type, labels); 'global' when the instance is unknown."""
    instance_id = cfg.instance_id or _metadata("id", timeout_s)
    zone = cfg.zone or _metadata("zone", timeout_s).rsplit("/", 1)[-1]
    if not (instance_id and zone):
        log.warning("instance id or zone unknown (config empty, metadata server "
                    "unreachable): entries go to resource 'global'")
        return "global", {"project_id": cfg.project_id}
    return "gce_instance", {"project_id": cfg.project_id,
                            "instance_id": instance_id, "zone": zone}


def _metadata(path: str, timeout_s: float) -> str:
    req = urllib.request.Request(METADATA + path, headers={"Metadata-Flavor": "Google"})
    # No proxy: an http_proxy in the environment must not see this request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            return resp.read().decode().strip()
    except OSError:
        return ""
