"""cirlab: composed image retrieval methods, exact benchmark protocols, an index and a search service."""

__version__ = "0.1.0"
