"""The on-disk collection: HDF5 shards plus manifest.json, in generations.  Never imports torch.

The only package that writes a collection's files (layout.py names them all).
"""
from .collection import Collection, GenerationGone, NotAnItem, RowReader
from .copy import linked_copy
from .edit import delete_items, read_ids_file, rewrite_shards
from .layout import INDEX_DIR, MODEL_FILE, REJECTS, SHARD_DIR, UPLOAD_DIR
from .lock import WriteLock
from .manifest import publish, read_manifest, write_manifest
from .transaction import OutsideDirectory, Transaction, store_file, transaction
from .writer import CollectionWriter

__all__ = ["Collection", "GenerationGone", "NotAnItem", "CollectionWriter", "RowReader", "WriteLock", "read_manifest",
           "write_manifest", "publish", "delete_items", "read_ids_file", "rewrite_shards", "transaction",
           "Transaction", "OutsideDirectory", "store_file", "linked_copy", "REJECTS", "SHARD_DIR", "INDEX_DIR",
           "MODEL_FILE", "UPLOAD_DIR"]
