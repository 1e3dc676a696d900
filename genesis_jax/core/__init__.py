"""The ground floor every part stands on: errors, the byte vocabulary, safe file writing, version bridges, platforms."""
