"""The subcommands of ``speed_table.py``: training speed, decode speed and builds, decode profiles."""
