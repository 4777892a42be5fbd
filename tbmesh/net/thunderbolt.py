"""A Mac's Thunderbolt ports, their generation and link speed, and who is at the other end,
from `system_profiler -json SPThunderboltDataType` (tests/fixtures/macos/, see SOURCES.md).

What the output says, and what is read from it:
- one entry per bus ("thunderboltusb4_bus_N"), its own port in "receptacle_1_tag": an idle
  port says what it could do ("Up to 120 Gb/s": Thunderbolt 5, whose 80 Gb/s links may
  boost to 120 one way; "Up to 40 Gb/s": Thunderbolt 4 or 3), a connected one the speed of
  the link ("80 Gb/s": Thunderbolt 5 at both ends and in the cable; "40 Gb/s": one of
  them is Thunderbolt 4 or 3).
- "_items" of a bus: the device at the other end. Another Mac is a host offering the
  "service_ip" service (IP over Thunderbolt); docks and drives offer none.
- A peer Mac with RDMA enabled offers one more service, protocol id 64087 (its service key
  prints as "rdma" in the text form, exo#1390); seen from the other end of the same cable,
  a Mac with RDMA disabled does not (osaurus's recorded pair, files json.3 and json.4).
  This is read from recorded outputs, not from Apple's documentation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

RDMA_SERVICE_PROTOCOL = 64087
THUNDERBOLT_5_GBPS = 80  # the symmetric link rate of Thunderbolt 5 (Thunderbolt 4: 40)


@dataclass(frozen=True)
class ThunderboltPort:
    """One port of this Mac (a bus's receptacle) and what is cabled to it."""

    bus: str  # "thunderboltusb4_bus_1"
    receptacle: str  # "2", as the Mac numbers it; "" when not given
    speed: str  # "80 Gb/s" when connected, "Up to 120 Gb/s" when idle
    connected: bool
    peer: str = ""  # the device at the other end: "Mac Studio", "Envoy Ultra"
    peer_model: str = ""  # "Mac15,14" for a Mac
    peer_is_mac: bool = False
    peer_rdma: bool = False  # the peer Mac has RDMA enabled

    @property
    def gbps(self) -> int | None:
        """The link speed when connected; what the port can do when idle ("Up to 120" -> 120)."""
        match = re.search(r"(\d+) Gb/s", self.speed)
        return int(match[1]) if match else None

    @property
    def thunderbolt_5(self) -> bool | None:
        """Whether the port is Thunderbolt 5; None when a slower link does not tell."""
        gbps = self.gbps
        if gbps is None:
            return None
        if gbps >= THUNDERBOLT_5_GBPS:
            return True
        return False if not self.connected else None  # a 40 Gb/s link may be a TB5 port to a TB4 device

    @property
    def name(self) -> str:
        return f"port {self.receptacle}" if self.receptacle else self.bus


def parse_thunderbolt_json(text: str) -> list[ThunderboltPort]:
    """The ports of `system_profiler -json SPThunderboltDataType`, in the order printed."""
    try:
        buses = json.loads(text)["SPThunderboltDataType"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not system_profiler's Thunderbolt JSON ({type(error).__name__}: {error})") from None
    ports = []
    for bus in buses:
        own = bus.get("receptacle_1_tag") or {}
        items: list[dict[str, Any]] = bus.get("_items") or []
        peer = items[0] if items else {}
        services = peer.get("services_title") or []
        ports.append(ThunderboltPort(
            bus=str(bus.get("_name", "")),
            receptacle=str(own.get("receptacle_id_key", "")),
            speed=str(own.get("current_speed_key", "")),
            connected=own.get("receptacle_status_key") == "receptacle_connected",
            peer=str(peer.get("_name", "")),
            peer_model=str(peer.get("device_name_key", "")),
            peer_is_mac=any(s.get("_name") == "service_ip" for s in services),
            peer_rdma=any(s.get("protocol_id_key") == RDMA_SERVICE_PROTOCOL for s in services),
        ))  # fmt: skip
    return ports
