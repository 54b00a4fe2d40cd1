"""`lazysnap convert`: the converter to eStargz / zstd:chunked, the layer writers and `--optimize`."""
