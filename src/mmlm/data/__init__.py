"""Data for mmlm: readers per format, streaming datasets, and the synthetic worlds (`mmlm.data.synthetic`)."""
