"""Data curation (SPEC section 10.2): raw talking-head videos to Stage-1 training shards.

`curate(inputs, out, config)` runs dedup -> scenes -> 25 fps / 16 kHz -> face crop -> motion -> faceless ->
occlusion -> SyncNet -> features -> attributes -> shards; see docs/curation.md.
"""

from flashhead.data.curate.config import CurateConfig
from flashhead.data.curate.runner import curate

__all__ = ["CurateConfig", "curate"]
