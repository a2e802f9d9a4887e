"""The prepared proof of sdrt's NVIDIA path on a lent GPU (README.md beside this file)."""
