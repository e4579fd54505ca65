"""Training data: the clip shard format, synthetic talking-head generators, and the `flashhead data` CLI."""
