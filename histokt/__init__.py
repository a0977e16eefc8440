"""histokt: HistoKT cross knowledge transfer as a resumable HPC batch system."""

__version__ = "0.1.0"
