import sys
from pathlib import Path

# The modules are flat files at the repository root; tests/ holds shared helpers too.
ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
