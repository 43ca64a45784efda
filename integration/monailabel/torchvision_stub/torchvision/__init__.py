"""Stand-in for torchvision inside MONAI Label's own virtual environment (not the project's).

MONAI Label 0.8.5 imports torchvision at start-up, but the registry's torchvision is a CUDA build
that fails to import with the CPU torch wheel these machines use. The bundles never use
torchvision; MONAI Label's start-up only needs ``torchvision.utils.make_grid``/``save_image`` to
exist. Do not install this where a real torchvision works.
"""

__version__ = "0.0.0+standin"

from . import utils  # noqa: E402,F401
