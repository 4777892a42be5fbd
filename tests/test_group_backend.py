"""Which MLX backend a tensor group's ranks start with, and the file and environment each
rank is given (tbmesh.serving.group.launch): jaccl when every two members publish an RDMA
device on their cable, else ring. Pure: the ring path runs for real in test_tensor_serving."""

from __future__ import annotations

import json

from tbmesh.core.types import Stage
from tbmesh.runtime.tensor import group_ports
from tbmesh.serving.group import jaccl_devices, launch

# Four Studios cabled all to all, as MLX's docs' example matrix ("Distributed Without
# mlx.launch", JACCL); (a, b) -> a's device on its cable to b, as ClusterView.rdma gives it.
CABLES = {("m1", "m2"): ("en5", "en5"), ("m1", "m3"): ("en4", "en4"), ("m1", "m4"): ("en3", "en3"),
          ("m2", "m3"): ("en3", "en3"), ("m2", "m4"): ("en4", "en4"), ("m3", "m4"): ("en5", "en5")}
RDMA = {pair: f"rdma_{ends[0]}" for pair, ends in CABLES.items()} | \
       {(b, a): f"rdma_{ends[1]}" for (a, b), ends in CABLES.items()}
GROUP = Stage("m1", 0, 30, 10, ("m1", "m2", "m3", "m4"))
ADDRESSES = ["10.0.12.1", "10.0.12.2", "10.0.23.3", "10.0.24.4"]  # as m2 sees them (Host.group_addresses)


def test_every_pair_with_rdma_gives_jaccls_device_matrix():
    assert jaccl_devices(GROUP.group, RDMA) == [
        [None, "rdma_en5", "rdma_en4", "rdma_en3"],
        ["rdma_en5", None, "rdma_en3", "rdma_en4"],
        ["rdma_en4", "rdma_en3", None, "rdma_en5"],
        ["rdma_en3", "rdma_en4", "rdma_en5", None],
    ]


def test_a_pair_without_rdma_at_either_end_means_no_jaccl():
    one_sided = {k: v for k, v in RDMA.items() if k != ("m4", "m2")}  # m4 has RDMA off, or a TB4 port
    assert jaccl_devices(GROUP.group, one_sided) == "no RDMA between m2 and m4"
    assert jaccl_devices(GROUP.group, {}) == "no RDMA between m1 and m2"
    assert isinstance(jaccl_devices(("m1", "m2"), one_sided), list)  # a pair that has it needs no more


def test_a_group_with_rdma_everywhere_starts_jaccl_with_its_matrix_and_rank_0_as_coordinator():
    how = launch(GROUP, 7, "m2", ADDRESSES, RDMA, "/tmp/tbmesh-group-x.json")
    ports, control = group_ports(7, 0, 4)
    assert how.backend == "jaccl"
    assert how.env == {"MLX_RANK": "1", "MLX_JACCL_COORDINATOR": f"10.0.12.1:{ports[0]}",
                       "MLX_IBV_DEVICES": "/tmp/tbmesh-group-x.json", "MLX_METAL_FAST_SYNCH": "1"}
    assert ports[0] != control  # rank 0's control channel listens on the same address
    assert json.loads(how.text) == jaccl_devices(GROUP.group, RDMA)
    # every member writes the same matrix (it follows the plan's rank order, not the member)
    assert launch(GROUP, 7, "m4", ADDRESSES, RDMA, "/x").text == how.text


def test_a_group_without_rdma_everywhere_starts_the_ring_as_before():
    partial = {k: v for k, v in RDMA.items() if "m3" not in k}
    how = launch(GROUP, 7, "m2", ADDRESSES, partial, "/tmp/tbmesh-group-y.json")
    ports, _ = group_ports(7, 0, 4)
    assert how.backend == "ring" and how.why == "no RDMA between m1 and m3"
    assert how.env == {"MLX_RANK": "1", "MLX_HOSTFILE": "/tmp/tbmesh-group-y.json"}
    assert json.loads(how.text) == [[f"{a}:{p}"] for a, p in zip(ADDRESSES, ports)]
    assert launch(GROUP, 7, "m2", ADDRESSES, {}, "/y").backend == "ring"
