"""The stream log: one interface (`StreamStore`), two implementations.

- `MemoryStore`: the embedded default, one process, nothing to install.
- `RedisStore`: a Redis Stream per generation plus a metadata hash, so any
  replica can serve a resume and a chunk survives the replica that made it.
"""

from tokenrelay_server.store.base import StreamStore, StreamTail
from tokenrelay_server.store.memory import MemoryStore

__all__ = ["MemoryStore", "StreamStore", "StreamTail"]
