"""What every stage shares: settings, schemas, key and field names (the wire), tasks, Lua
scripts, connections and process lifecycle. Imports nothing of tribunal's own above it."""

DISTRIBUTION = "tribunal"  # checked by tribunal.foreign_packages: this is tribunal's ``common``
