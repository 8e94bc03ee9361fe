"""Detectron2 YAML recipes shipped with mocobench (data only; see transfer/recipes.py and docs/transfer.md)."""
