"""Evaluate a face-recognition checkpoint (verification sets, IJB-B/C 1:1, exports).

    python eval.py --checkpoint DIR [--sets lfw,cfp_fp,agedb_30 --data-dir D] [--out results.json]

``python eval.py --help`` lists every option; the work is in ``x2jax.evaluation.main``
(docs/evaluation.md).
"""

import sys

if __name__ == "__main__":
    from x2jax.runtime import use_fast_cpu_flags

    use_fast_cpu_flags()  # before JAX starts: XLA_FLAGS is read once
    from x2jax.evaluation.main import main

    sys.exit(main())
