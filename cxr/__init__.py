"""cxr: a reproducible, data-versioned pneumonia-vs-normal classifier for pediatric chest X-rays.

The DVC pipeline (dvc.yaml) calls thin scripts in stages/, which call this package.
"""

__version__ = "0.1.0"
