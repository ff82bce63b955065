"""Data: corpus preparation (text -> token files) and instruction data."""
