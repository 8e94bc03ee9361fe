"""Detection transfer with detectron2: MoCo's Faster/Mask R-CNN recipes, the runner and its CPU smoke.

Importing this package never imports detectron2 (`mocobench.transfer.recipes` and `mocobench.transfer.cli` are plain Python;
`mocobench.transfer.train`, `mocobench.transfer.datasets` and `mocobench.transfer.modeling` need detectron2). See docs/transfer.md.
"""
