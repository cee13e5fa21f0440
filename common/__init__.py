"""Shared pieces: settings, schemas, key names, the decision rule and the consumer loop."""
