"""lazysnap's data path: everything a read() touches - layer formats, the registry client, the
fetcher, the chunk cache and the pyfuse3 filesystem. Nothing here imports `snapshotter`.

Note: this package imports as `fuse`, as fusepy's module does; install lazysnap into its own venv."""
