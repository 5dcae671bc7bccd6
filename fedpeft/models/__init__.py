"""Base models (built-in names or local paths), PEFT wrapping, and adapter state in/out of peft."""
