"""Input side: shards on disk, the views sampled from them, and the DALI / torch pipelines that decode them."""
