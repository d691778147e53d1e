"""The compatibility matrix (compat/MATRIX.md): does prefix sharing give the numbers of the plain model?

* :mod:`.deep`: every (architecture, backend, adapter, packing, dtype) cell of the seven tiny architectures,
  :func:`run_matrix`; one group of cells, :func:`run_group`.
* :mod:`.breadth`: every causal LM of the installed transformers, exact, refused or not built,
  :func:`run_enumeration`; one model type, :func:`check_architecture`.
* :mod:`.report`: the Markdown of MATRIX.md (:func:`render_report`) and the JSON record (:func:`json_report`).

``compat/run_matrix.py`` is the command line over this package::

    from prefixshare.testing import matrix

    cells = matrix.run_matrix(["llama"], ["sdpa"], ["lora"], dtypes=["float32"], settings=matrix.Settings(device="cpu"))
    assert all(c.state in matrix.RAN_OK for c in cells)
"""

from .breadth import (
    ENUM_BACKENDS,
    ENUM_PACKINGS,
    ENUM_RESPONSES,
    EXACT,
    LEAK_VISIBLE,
    NOT_BUILT,
    REFUSED,
    ArchitectureResult,
    breadth_examples,
    check_architecture,
    leaky_layout,
    run_enumeration,
)
from .deep import (
    ADAPTERS,
    ARCHITECTURES,
    BACKENDS,
    DTYPES,
    ERROR,
    FAIL,
    NOT_RUN,
    NOT_SUPPORTED,
    PACKINGS,
    PASS,
    PASS_LOGPS_ONLY,
    PASS_REFERENCE_KERNEL,
    QUICK,
    RAN_OK,
    REASON_BF16,
    REASON_FLEX_CPU,
    REASON_GEMMA2_SDPA,
    REASON_VARLEN_REFERENCE,
    TOLERANCE,
    Cell,
    Settings,
    default_device,
    make_collator,
    make_examples,
    run_group,
    run_matrix,
)
from .progress import Progress
from .report import breadth_summary, json_report, readme_support_summary, render_report, versions

__all__ = [
    "ADAPTERS",
    "ARCHITECTURES",
    "BACKENDS",
    "DTYPES",
    "ENUM_BACKENDS",
    "ENUM_PACKINGS",
    "ENUM_RESPONSES",
    "ERROR",
    "EXACT",
    "FAIL",
    "LEAK_VISIBLE",
    "NOT_BUILT",
    "NOT_RUN",
    "NOT_SUPPORTED",
    "PACKINGS",
    "PASS",
    "PASS_LOGPS_ONLY",
    "PASS_REFERENCE_KERNEL",
    "QUICK",
    "RAN_OK",
    "REASON_BF16",
    "REASON_FLEX_CPU",
    "REASON_GEMMA2_SDPA",
    "REASON_VARLEN_REFERENCE",
    "REFUSED",
    "TOLERANCE",
    "ArchitectureResult",
    "Cell",
    "Progress",
    "Settings",
    "breadth_examples",
    "breadth_summary",
    "check_architecture",
    "default_device",
    "json_report",
    "leaky_layout",
    "make_collator",
    "make_examples",
    "readme_support_summary",
    "render_report",
    "run_enumeration",
    "run_group",
    "run_matrix",
    "versions",
]
