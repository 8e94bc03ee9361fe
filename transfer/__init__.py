"""Detection transfer with detectron2: MoCo's Faster/Mask R-CNN recipes, the runner and its CPU smoke.

Importing this package never imports detectron2 (`transfer.recipes` and `transfer.cli` are plain Python;
`transfer.train`, `transfer.datasets` and `transfer.modeling` need detectron2). See docs/transfer.md.
"""
