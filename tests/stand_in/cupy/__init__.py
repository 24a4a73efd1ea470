"""With tests/stand_in on PYTHONPATH, `import cupy` finds this first and puts the stand-in for CuPy
(tests/fake_cupy.py) in its place, with the options of fake_cupy.install() in $FAKE_CUPY (such as
"gpus=2 shuffle_scatter=0"): for other processes of the tests (mpiexec's ranks) and for
scripts/gpu_check.sh's rehearsal on a CPU. Nothing in the product knows of it."""
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/
import fake_cupy  # noqa: E402

fake_cupy.install_from(os.environ.get("FAKE_CUPY", ""))  # sys.modules["cupy"] and ["cupyx"] now the stand-ins
