"""The data model: sections as read from disk, and slides as methods see them."""

from stbench.data.model import Dataset, Section, SectionInfo, Slide

__all__ = ["Dataset", "Section", "SectionInfo", "Slide"]
