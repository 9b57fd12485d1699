"""Weight sharing (Deep Compression): 1-D k-means and the shared-weight parametrization."""
