"""Snapshots: the metadata record, the atomic store, the operations and the facades."""
