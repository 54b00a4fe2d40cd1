"""lazysnap's control plane: the containerd snapshotter service, snapshot store, configuration, CLI
and converter. It imports the data path (`fuse`), never the reverse."""

__version__ = "0.1.0"
