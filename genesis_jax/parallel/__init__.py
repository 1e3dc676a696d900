"""Devices and processes: the mesh and its sharding rules, joining and agreeing across processes."""
