"""Image embedding index: FAISS for search, SQLite for metadata and the vectors themselves."""

from mmlm.index.build import BuildReport, build_index, list_images
from mmlm.index.metadata import ImageRecord
from mmlm.index.store import Hit, ImageIndex
from mmlm.index.vectors import AnnSettings

__all__ = ["AnnSettings", "BuildReport", "Hit", "ImageIndex", "ImageRecord", "build_index", "list_images"]
