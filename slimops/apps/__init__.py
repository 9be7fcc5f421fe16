"""The applications built on the library: the command line (``cli``), the demo, the
benchmark report and image-folder data for ``slimops train``.

Nothing in the library imports this package (``import slimops`` loads the ops, layers,
width state, models and export only; tests/test_architecture.py keeps it so).
"""
