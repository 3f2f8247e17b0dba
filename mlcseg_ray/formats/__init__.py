"""The files a run reads and writes, and how: the manifest, the feature store, masks, images, dataset layouts."""
