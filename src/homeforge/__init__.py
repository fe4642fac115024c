"""homeforge: from a folder of private documents to an evaluated, compressed, served model, offline."""

__version__ = "0.1.0"
