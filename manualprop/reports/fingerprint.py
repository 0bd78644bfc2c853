"""The environment fingerprint written into every JSON report.

Versions are read from package metadata, never by importing a framework. Settings that change
the bits of a float32 step (the BLAS and its threads, oneDNN, TF32) are read from frameworks only
when the run has imported them already, so ``--engines numpy`` stays free of torch and
TensorFlow. Measured here: turning TF_ENABLE_ONEDNN_OPTS off changes Keras float32 deltas in
about half the tensors, by up to 6e-8.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

import numpy as np

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE")


def version(*distributions: str) -> str | None:
    """The installed version of the first of ``distributions`` that is installed."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _blas() -> list[dict[str, Any]] | dict[str, Any]:
    """The BLAS libraries loaded in this process (threadpoolctl), or the one NumPy was built with."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        if not hasattr(np, "show_config"):
            return {}
        config = np.show_config(mode="dicts")
        return dict(config.get("Build Dependencies", {}).get("blas", {}))
    keys = ("internal_api", "version", "num_threads", "threading_layer", "architecture", "prefix")
    return [{k: lib[k] for k in keys if k in lib} for lib in threadpool_info()]


def _torch_settings() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "torch_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "torch_tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _tensorflow_settings() -> dict[str, Any]:
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return {}
    settings: dict[str, Any] = {
        "tensorflow_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tensorflow_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "tensorflow_tf32": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
    }
    for name in ("keras", "tf_keras"):
        if name in sys.modules:
            keras = sys.modules[name]
            backend = keras.backend.backend() if hasattr(keras.backend, "backend") else "tensorflow"
            settings.setdefault("keras_api", []).append(f"{name} {keras.__version__} ({backend})")
    return settings


def environment() -> dict[str, Any]:
    """Versions, the BLAS, thread counts, oneDNN and TF32 settings of this process."""
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": version("torch"),
        "tensorflow": version("tensorflow", "tensorflow-cpu"),
        "keras": version("keras"),
        "tf_keras": version("tf-keras", "tf_keras"),
        "manualprop": version("manualprop"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "blas": _blas(),
        "thread_variables": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "TF_ENABLE_ONEDNN_OPTS": onednn if onednn is not None else "unset (TensorFlow's default: on for x86 CPUs)",
        "TF_USE_LEGACY_KERAS": os.environ.get("TF_USE_LEGACY_KERAS"),
        **_torch_settings(),
        **_tensorflow_settings(),
    }
