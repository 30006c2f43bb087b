"""The storage layer: a session's bytes on disk (write-ahead log, snapshots, group fsync, data dir).

The journal (journal.py) decides when to write; it is handed the replay function rather than
importing the step code; see docs/architecture.md."""
