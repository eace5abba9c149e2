"""Data for mmlm: the embedded shapes-world generator (`mmlm.data.shapes`) and the dataset readers."""
