"""Load microscope OPD/phase exports into an opdcells HDF5 dataset: ``python -m opdcells load``, by the
name users know.

Usage and exit status: ``python load_data.py --help`` (the code is :mod:`opdcells.load`).
"""
import sys

from opdcells.load import main

if __name__ == "__main__":
    sys.exit(main(prog="load_data.py"))
