"""Running one query over many machines: each task reads one chunk (HEALPix partitions) of the partitioned
relation, and the driver combines the per-chunk results into the answer the query gives on all rows."""
