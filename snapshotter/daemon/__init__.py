"""`lazysnap serve`: containerd's snapshots service over gRPC, the snapshot store and the lazy data path."""
