"""flashhead: real-time, infinite-length, audio-driven talking-head video."""

__version__ = "0.1.0.dev0"
