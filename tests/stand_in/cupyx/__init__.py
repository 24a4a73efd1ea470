"""`import cupyx` before `import cupy`: the stand-in of both (see ../cupy/__init__.py)."""
import cupy  # noqa: F401  (installs sys.modules["cupyx"] as well, which this import then returns)
