"""The real-input bound of a classification distillation: the central_distillation bundle's own run (its teacher,
student, cache, loss, weight average and iterations) on the sites' real training images instead of synthesized ones.

Not data-free: an in-process diagnostic. Against the data-free run on the same sites it splits the student's distance to
its teachers into what the synthesis costs (the bound closes that part) and what the distillation itself costs at this
budget (the bound keeps it). Used as the classification variant ``real_inputs``
(:mod:`monai_fedkd.benchmarks.classification_variants`); the bundle builds it with::

    generator_iterations: 0
    distillation#_target_: monai_fedkd.benchmarks.real_input_bound.RealInputDistillation
    distillation#real_sites: "@query_sites"

(segmentation has its own bound, ``segmentation_generators.real_input_upper_bound``, which cuts patches of the
synthesis size from whole volumes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai_fedkd.server import CentralDistillation

REAL_INPUT_STREAM = 5  # the step's random stream that draws the real images (0-4 are the distillation's own)


class RealInputDistillation(CentralDistillation):
    """:class:`CentralDistillation` whose every step labels a batch of the sites' pooled real training images (drawn
    uniformly, so each site in proportion to the images it holds) with forward-only queries; the generator is never
    trained or used. ``real_sites`` are the in-process site objects (the bundle's ``query_sites``), loaded with
    their real images (each site's first ``site_options.max_real``, the images its discriminator holds)."""

    def __init__(self, *args, real_sites: Sequence, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.task != "classification":
            raise ValueError(f"RealInputDistillation is the classification bound (whole images); these sites do {self.task}: "
                             "use segmentation_generators.real_input_upper_bound")
        if self.generator_iterations != 0:
            raise ValueError(f"RealInputDistillation trains no generator: set generator_iterations 0, got {self.generator_iterations}")
        empty = [getattr(s, "name", "?") for s in real_sites if getattr(s, "real_images", None) is None or len(s.real_images) == 0]
        if not real_sites or empty:
            raise ValueError(f"RealInputDistillation needs every site's real training images, and sites {empty or '(none given)'} "
                             "hold none (with_real_images false, or an empty training split)")
        self.real_images = torch.cat([s.real_images.float() for s in real_sites]).to(self.device)

    def _forward_only_inputs(self, z, labels, step: int) -> torch.Tensor:
        idx = torch.randint(len(self.real_images), (self.batch_size,), generator=self._rng(step, REAL_INPUT_STREAM))
        return self.real_images[idx.to(self.real_images.device)]

    def _write_montage(self, engine) -> None:
        """No montage: the inputs are the sites' own images, which the server's outputs should not hold."""

    def central_card(self, engine) -> dict:
        return {**super().central_card(engine), "generator_def": None,
                "upper_bound": "student distilled on the sites' real training images (not data-free)"}
