"""What each backend accepts, by name, importable without the backends' libraries (so `--help` lists them fast);
each backend module takes its names from here, and a test checks the registry holds exactly BACKENDS."""

BACKENDS = ("zarr", "webdataset")
COMPRESSORS = ("lz4", "zstd", "none")  # zarr: Blosc with lz4 or zstd, or none
IMAGE_FORMATS = ("png", "npy")  # webdataset: how a shard's images are encoded
