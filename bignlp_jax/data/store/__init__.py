"""Token stores at scale: shards and their manifest, chunk checksums, raw-file and Ray builds."""
