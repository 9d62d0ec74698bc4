"""Data: the Miniscapes format and codecs (`miniscapes`), folder and shard datasets (`folder`,
`shards`), the synthetic scene generator (`synthetic`), joint augmentation (`transforms`),
loaders (`loader`), the one-buffer batches their workers hand over (`packed`) and device
batches (`batch`); `build` decides which data a configuration means and opens it
(`resolve_source`, `build_loaders`, `open_split`).

This file imports nothing: importing a constant from one module (the codec, say) does not pull
in fsspec, webdataset or the loaders.
"""
