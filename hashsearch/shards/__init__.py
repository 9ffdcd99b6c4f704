"""The on-disk collection: HDF5 shards plus manifest.json.  Never imports torch."""
from .collection import Collection
from .manifest import read_manifest, write_manifest
from .writer import CollectionWriter, REJECTS, SHARD_DIR

__all__ = ["Collection", "CollectionWriter", "read_manifest", "write_manifest", "REJECTS", "SHARD_DIR"]
