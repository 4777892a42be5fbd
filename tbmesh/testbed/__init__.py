"""Trying tbmesh without a cluster of Macs: the simulator and the tiny test models."""
