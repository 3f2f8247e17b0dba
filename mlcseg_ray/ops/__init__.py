"""The maths, as plain functions over arrays: k-means, the level rules, the CRF, regions, metrics. No I/O, no Ray."""
