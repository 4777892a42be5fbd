"""Bonjour discovery of tbmesh peers on the chosen interfaces only.

Every daemon registers `<node id>._tbmesh._tcp.local.` with a small TXT record and browses
for the others. Discovery only says where a peer can be dialled: mDNS keeps records of a
crashed or unplugged peer for minutes, so liveness comes from our heartbeats, never from here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_tbmesh._tcp.local."


@dataclass(frozen=True)
class Advert:
    """What we tell the network about ourselves."""

    node_id: str
    name: str
    cluster: str
    version: int
    port: int


@dataclass(frozen=True)
class Found:
    """A peer seen on the network, with where to dial it."""

    node_id: str
    name: str
    cluster: str
    version: int
    addresses: tuple[str, ...]
    port: int


def txt_record(advert: Advert) -> dict[str, str]:
    return {
        "id": advert.node_id,
        "name": advert.name[:60],
        "cluster": advert.cluster,
        "v": str(advert.version),
        "port": str(advert.port),
    }


def parse_txt(properties: dict[bytes, bytes | None]) -> dict[str, str] | None:
    """The TXT record as text, or None when it is not one of ours (or is malformed)."""
    try:
        text = {k.decode(): (v or b"").decode() for k, v in properties.items()}
        int(text["v"]), int(text["port"])
    except (UnicodeDecodeError, KeyError, ValueError):
        return None
    return text if text.get("id") else None


class Discovery:
    def __init__(
        self,
        addresses: list[str],
        advert: Advert,
        on_found: Callable[[Found], None],
        on_removed: Callable[[str], None] | None = None,
    ) -> None:
        self.addresses = addresses
        self.advert = advert
        self.on_found = on_found
        self.on_removed = on_removed or (lambda node_id: None)
        self.zc: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self.info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.zc = AsyncZeroconf(interfaces=self._bind_list(), ip_version=IPVersion.V4Only)
        self.info = self._service_info()
        await self.zc.async_register_service(self.info, allow_name_change=False)
        self.browser = AsyncServiceBrowser(
            self.zc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
        )

    async def refresh(self, addresses: list[str]) -> None:
        """An interface changed: rebind multicast to the new addresses, announce ourselves
        again, and browse afresh (peers behind a new cable answer a new query at once)."""
        if self.zc is None:
            return
        changed = addresses != self.addresses
        self.addresses = addresses
        self.info = self._service_info()
        if changed:
            # The registry first: rebinding re-announces what is registered, and announcing
            # the old addresses would make peers wait for the next round (~0.45 s).
            self.zc.zeroconf.registry.async_update(self.info)
            await self.zc.async_update_interfaces(self._bind_list())
        await self.zc.async_update_service(self.info)
        if self.browser is not None:
            await self.browser.async_cancel()
        self.browser = AsyncServiceBrowser(
            self.zc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
        )

    async def stop(self) -> None:
        """Withdraw our record (goodbye packets) and close the sockets."""
        if self.zc is None:
            return
        if self.browser is not None:
            await self.browser.async_cancel()
        try:
            await asyncio.wait_for(self.zc.async_unregister_all_services(), 2)
        except (asyncio.TimeoutError, OSError) as error:
            log.debug("unregistering: %s", error)
        await self.zc.async_close()
        self.zc = None
        for task in self._tasks:
            task.cancel()

    def _bind_list(self) -> list[str]:
        # zeroconf needs at least one interface; with none up yet, listen on loopback only
        return list(self.addresses) or ["127.0.0.1"]

    def _service_info(self) -> AsyncServiceInfo:
        ipv4 = [a for a in self.addresses if ":" not in a]
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.advert.node_id}.{SERVICE_TYPE}",
            port=self.advert.port,
            properties=txt_record(self.advert),
            addresses=[socket.inet_aton(a) for a in ipv4],
            server=f"tbmesh-{self.advert.node_id}.local.",
        )

    def _on_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self.on_removed(name.split(".", 1)[0])
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self.zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self.zc.zeroconf, 3000):
            return
        txt = parse_txt(info.properties)
        if txt is None:
            log.info("ignoring %s: not a tbmesh TXT record", name)
            return
        if txt["id"] == self.advert.node_id:
            return
        if txt.get("cluster") != self.advert.cluster:
            log.debug("ignoring %s: cluster %r, ours is %r", name, txt.get("cluster"), self.advert.cluster)
            return
        addresses = tuple(info.parsed_scoped_addresses(IPVersion.V4Only))
        if not addresses or not info.port:
            return
        self.on_found(
            Found(txt["id"], txt.get("name", txt["id"]), txt["cluster"], int(txt["v"]), addresses, info.port)
        )
