"""Checkpoint reading (safe, every known format), model building, conversion and the inspect/convert commands."""
