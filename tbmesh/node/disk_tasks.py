"""The model's weights on our disk, kept in step with the cluster by two loops: the manifest
(hashed from our files, or taken from a peer, or made from the parts every Mac holds) and the
copies of layers the leader asks us to keep (tbmesh.core.replicas)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tbmesh.core.messages import KeepOnDisk
from tbmesh.node.control import ControlPlane
from tbmesh.weights import bulk

if TYPE_CHECKING:
    from tbmesh.serving.disk import Disk

log = logging.getLogger("tbmesh")

MANIFEST_CHECK_S = 0.5  # how often a node without its model's manifest looks for a peer with it
KEEP_CHECK_S = 2.0  # how often a node looks for copies of layers the leader asks it to keep


class DiskTasks:
    def __init__(self, disk: Disk, control: ControlPlane) -> None:
        self.disk = disk
        self.control = control

    async def complete_manifest(self) -> None:
        """Hash our model into its manifest, or take the manifest from a peer when we lack
        the weights; publish what our disk holds each time it changes."""
        disk, core = self.disk, self.control.core
        if disk.manifest is None:
            try:
                await asyncio.to_thread(disk.build)
            except (OSError, ValueError) as error:
                log.error("cannot hash the model in %s, so no peer can fetch from us: %s", disk.model_dir, error)
            self.control.set_disk(disk.state())
        tried: dict[str, int] = {}
        while disk.manifest is None:
            await asyncio.sleep(MANIFEST_CHECK_S)
            peer_disks = [d for n, d in core.disks().items() if n != core.id and d.model == disk.name]
            offers = {(d.manifest, d.manifest_bytes) for d in peer_disks if d.manifest}
            parts = {d.part: d.part_bytes for d in peer_disks if d.part}
            if not offers and disk.part is not None and parts and parts != tried:
                tried = parts  # every Mac holds a part: the whole is their union, once they hold it all
                try:
                    if await asyncio.to_thread(disk.assemble, disk.peers(), parts):
                        self.control.set_disk(disk.state())
                except (OSError, ValueError, bulk.FetchFailed) as error:
                    log.warning("cannot make the manifest of %s from the parts yet: %s", disk.name, error)
                    tried = {}
                continue
            if not offers:
                continue
            if len(offers) > 1:
                log.warning("peers hold different models named %s: taking the cluster's", disk.name)
            wanted = core.model_manifest()  # the one the leader plans for, see ClusterNode
            digest, nbytes = min(offers, key=lambda offer: (offer[0] != wanted, offer))
            try:
                await asyncio.to_thread(disk.take_manifest, disk.peers(), digest, nbytes)
            except (OSError, ValueError, bulk.FetchFailed) as error:  # a manifest that does not parse
                log.warning("cannot take the manifest of %s from peers yet: %s", disk.name, error)
                continue
            log.info("took the manifest of %s from a peer: %d tensors, %d layers", disk.name,
                     len(disk.manifest.tensors), disk.spec.num_layers if disk.spec else 0)
            self.control.set_disk(disk.state())

    async def keep_copies(self) -> None:
        """Fetch the copies of layers the leader asks us to keep on disk (tbmesh.core.replicas),
        while no stage fetch needs the cables."""
        disk, core = self.disk, self.control.core
        asked: KeepOnDisk | None = None
        while True:
            await asyncio.sleep(KEEP_CHECK_S)
            if await asyncio.to_thread(disk.refresh):  # a weight file deleted, a disk unmounted
                self.control.set_disk(disk.state())
            # only what the leader has asked for a while, with a plan committed: copies asked
            # while Macs join and plans change would be fetched for nothing
            keep, before = core.my_keep(), asked
            asked = keep
            if keep != before or core.plan is None or core.preparing is not None:
                continue
            stages = [(s.start, s.end) for s in core.plan.stages if s.node == core.id]
            if freed := disk.trim(stages, keep):
                log.info("let go of %.1f MB of weights on disk that no stage or copy needs (--disk-slack)", freed / 1e6)
                self.control.set_disk(disk.state())
            if keep is None:
                continue
            missing = disk.kept_missing(keep)
            if not missing:
                continue
            log.info("keeping a copy of %s on disk for the cluster: %.1f MB to fetch", layers_text(keep),
                     sum(e.object_size for e in missing) / 1e6)
            try:
                report = await asyncio.to_thread(disk.fetch, missing, disk.peers(), copies=True)
            except (OSError, ValueError, bulk.FetchFailed) as error:
                log.warning("cannot keep a copy of %s yet: %s", layers_text(keep), error)
            else:
                log.info("kept a copy of %s%s", layers_text(keep), " (paused for a stage's fetch)" if report.stopped else "")
            self.control.set_disk(disk.state())


def layers_text(keep: KeepOnDisk) -> str:
    parts = [f"layers {a}-{b - 1}" if b - a > 1 else f"layer {a}" for a, b in keep.layers]
    return ", ".join(parts + [{"first": "the embedding", "last": "the head"}[end] for end in keep.ends])
