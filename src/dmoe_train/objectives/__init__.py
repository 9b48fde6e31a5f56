"""Objectives: the masked-diffusion noise and loss, the differentiable coreset-size regularizers
and the expert metrics (unique experts per block, load). Tensor functions over routing's
outputs; they know no model."""
