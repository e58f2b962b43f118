"""monai_fedkd: data-free federated distillation for medical imaging, as a MONAI plugin.

Sites train their own networks with the site bundles; the server (later) distils a central model
from their answers on synthetic inputs. See docs/architecture.md for where each concept lives.
"""

__version__ = "0.1.0"
