"""Scale-out on Ray: encoder actors for `encode --ray`, partition actors for `query`/`serve --ray`.

Ray is optional (pip install 'hashsearch[ray]'); nothing here imports it until a distributed run starts.
The layer sits on top of the engine and the encoders and only calls into them.
"""
from .cluster import ray_cluster
from .search import ShardedIndex, plan_partitions

__all__ = ["ray_cluster", "ShardedIndex", "plan_partitions"]
