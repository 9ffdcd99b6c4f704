"""The on-disk collection: HDF5 shards plus manifest.json, in generations.  Never imports torch."""
from .collection import Collection, GenerationGone, RowReader
from .edit import delete_items, editing, read_ids_file, rewrite_shards
from .lock import WriteLock
from .manifest import publish, read_manifest, write_manifest
from .writer import CollectionWriter, REJECTS, SHARD_DIR

__all__ = ["Collection", "GenerationGone", "CollectionWriter", "RowReader", "WriteLock", "read_manifest", "write_manifest", "publish",
           "delete_items", "read_ids_file", "rewrite_shards", "editing", "REJECTS", "SHARD_DIR"]
