"""vaeuda: the engine of the VAEUDASegmentation 3D Slicer extension.

Data-efficient unsupervised domain adaptation for cross-modality cardiac segmentation,
after Ouyang et al., MICCAI 2019. Importable and testable without Slicer: nothing in this
package imports ``slicer``, ``qt``, ``ctk`` or ``vtk``.
"""

__version__ = "0.2.0"

from .errors import VaeudaError  # noqa: E402,F401
